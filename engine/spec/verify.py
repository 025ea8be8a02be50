"""Verification of proposed tokens against the target model, lossless by construction.

Rows for one sequence: ``logits[j]`` is the target's distribution after draft tokens d_1..d_j
(row 0: after the last accepted token). With drafts d_1..d_k::

    greedy:   accept d_j while d_j == argmax(row j-1); then emit argmax of the first
              disagreeing row, or of row k (the bonus token) if all were accepted.
    sampled:  accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); on the first rejection
              emit a sample of normalise(max(p_j - q_j, 0)) and stop; if all are accepted emit a
              sample of p_k (bonus). q is the proposer's distribution: one-hot for n-gram
              proposals (so acceptance is p_j(d_j) and the residual is p_j without d_j), the
              draft model's filtered distribution for draft proposals.

This is the rejection scheme of Leviathan et al. / Chen et al.: every emitted token is
distributed exactly as the target's (temperature, top-k, top-p, min-p applied) distribution.
"""

from __future__ import annotations

import torch

from engine.sampler import filtered_probs, race
from engine.sequence import Sequence


def verify(
    logits: torch.Tensor,  # [k+1, V] float32 target rows
    drafts: list[int],  # k proposed tokens
    seq: Sequence,
    draft_probs: torch.Tensor | None = None,  # [k, V] proposer distribution; None = one-hot
) -> list[int]:
    """Tokens to append (1 .. k+1 of them). Two host syncs at most (accept flags, then the
    correction or bonus token), whatever k is."""
    k = len(drafts)
    assert logits.shape[0] == k + 1
    p = seq.params
    dev = logits.device
    if p.greedy:
        best = logits.argmax(dim=-1).tolist()  # [k+1]
        out = []
        for j, d in enumerate(drafts):
            if d != best[j]:
                return [*out, best[j]]
            out.append(d)
        return [*out, best[k]]
    probs = filtered_probs(logits, [p] * (k + 1))  # [k+1, V]
    d = torch.tensor(drafts, dtype=torch.long, device=dev)
    p_d = probs[:k].gather(1, d[:, None])[:, 0]  # [k]
    if draft_probs is None:
        accept = p_d  # q_d = 1
    else:
        q_d = draft_probs.gather(1, d[:, None])[:, 0]
        accept = torch.where(q_d > 0, (p_d / q_d.clamp_min(1e-30)).clamp_max(1.0), 0.0)
    # Draft j's uniform is the first draw of the generator keyed at output offset j (offset ==
    # tokens accepted before it); a rejection's correction continues that same stream.
    if p.seed is None:
        u = torch.rand(k, device=dev)
    else:
        u = torch.stack([
            torch.rand((), device=dev, generator=seq.generator(j, Sequence.RNG_VERIFY, dev))
            for j in range(k)
        ])  # fmt: skip
    accepted = (u < accept).tolist()
    n = accepted.index(False) if False in accepted else k
    if n == k:  # all accepted: the bonus token from the target's last row
        gen = seq.generator(k, Sequence.RNG_VERIFY, dev)
        return [*drafts, int(race(probs[k : k + 1], [gen])[0])]
    if draft_probs is None:
        residual = probs[n].clone()
        residual[drafts[n]] = 0.0
    else:
        residual = (probs[n] - draft_probs[n]).clamp_min(0.0)
    total = residual.sum()
    # p == q leaves nothing to correct: the target itself (no host sync to find out)
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), probs[n])
    gen = seq.generator(n, Sequence.RNG_VERIFY, dev)
    if gen is not None:
        torch.rand((), device=dev, generator=gen)  # past draft n's uniform, drawn above
    return [*drafts[:n], int(race(residual[None], [gen])[0])]
