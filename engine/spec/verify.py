"""Verification of proposed tokens against the target model, lossless by construction.

Rows for one sequence: ``logits[j]`` is the target's distribution after draft tokens d_1..d_j
(row 0: after the last accepted token). With drafts d_1..d_k::

    greedy:   accept d_j while d_j == argmax(row j-1); then emit argmax of the first
              disagreeing row, or of row k (the bonus token) if all were accepted.
    n-gram:   draw row j's token exactly as plain decoding would at that position (the
              sampler's race, with the seeded generator keyed at that output position); accept
              d_j while it equals the draw, then emit the first disagreeing draw (or row k's).
              A one-hot proposal needs no rejection step: the emitted tokens are the draws, so a
              seeded request produces the same tokens with speculation or without, whatever
              batch or verify window it is in (a migrated request resumes mid-window).
    draft:    accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); on the first rejection
              emit a sample of normalise(max(p_j - q_j, 0)) and stop; if all are accepted emit a
              sample of p_k (bonus); q is the draft model's filtered distribution. This is the
              rejection scheme of Leviathan et al. / Chen et al.: lossless in distribution, but
              its draws depend on the verify window, so seeded output is not token-equal to
              non-speculative decoding.

Either way every emitted token is distributed exactly as the target's (temperature, top-k,
top-p, min-p applied) distribution.
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
    if draft_probs is None:
        return _coupled(probs, drafts, seq)
    d = torch.tensor(drafts, dtype=torch.long, device=dev)
    p_d = probs[:k].gather(1, d[:, None])[:, 0]  # [k]
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
    residual = (probs[n] - draft_probs[n]).clamp_min(0.0)
    total = residual.sum()
    # p == q leaves nothing to correct: the target itself (no host sync to find out)
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), probs[n])
    gen = seq.generator(n, Sequence.RNG_VERIFY, dev)
    if gen is not None:
        torch.rand((), device=dev, generator=gen)  # past draft n's uniform, drawn above
    return [*drafts[:n], int(race(residual[None], [gen])[0])]


def _coupled(probs: torch.Tensor, drafts: list[int], seq: Sequence) -> list[int]:
    """One-hot drafts: row j's draw is the sampler's own for output offset j (its race, fed by
    the RNG_SAMPLE generator keyed at that position), so accepting d_j iff it equals the draw
    emits the very tokens plain decoding would. One host sync."""
    noise = torch.empty_like(probs).exponential_()  # [k+1, V]; unseeded rows keep these
    for j in range(probs.shape[0]):
        gen = seq.generator(j, Sequence.RNG_SAMPLE, probs.device)  # re-keyed per position
        if gen is not None:
            noise[j].exponential_(generator=gen)
    draws = (probs / noise).argmax(dim=-1).tolist()  # [k+1], as race() draws them
    out = []
    for d, t in zip(drafts, draws, strict=False):
        if d != t:
            return [*out, t]
        out.append(d)
    return [*out, draws[len(drafts)]]
