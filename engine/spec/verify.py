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

from engine.sampler import _filtered_probs
from engine.sequence import Sequence


def verify(
    logits: torch.Tensor,  # [k+1, V] float32 target rows
    drafts: list[int],  # k proposed tokens
    seq: Sequence,
    draft_probs: torch.Tensor | None = None,  # [k, V] proposer distribution; None = one-hot
) -> list[int]:
    """Tokens to append (1 .. k+1 of them)."""
    k = len(drafts)
    assert logits.shape[0] == k + 1
    p = seq.params
    if p.greedy:
        best = logits.argmax(dim=-1).tolist()  # [k+1]
        out = []
        for j, d in enumerate(drafts):
            if d != best[j]:
                return [*out, best[j]]
            out.append(d)
        return [*out, best[k]]
    probs = torch.stack([_filtered_probs(row, p.temperature, p.top_k, p.top_p, p.min_p)
                         for row in logits])  # [k+1, V]  # fmt: skip
    out = []
    for j, d in enumerate(drafts):
        gen = seq.generator(len(out), Sequence.RNG_VERIFY)
        q_d = 1.0 if draft_probs is None else float(draft_probs[j, d])
        accept = min(1.0, float(probs[j, d]) / q_d) if q_d > 0 else 0.0
        if torch.rand((), generator=gen).item() < accept:
            out.append(d)
            continue
        if draft_probs is None:
            residual = probs[j].clone()
            residual[d] = 0.0
        else:
            residual = (probs[j] - draft_probs[j]).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q: nothing left to correct, the target itself
            residual = probs[j]
        residual = residual / residual.sum()
        return [*out, int(torch.multinomial(residual, 1, generator=gen).item())]
    gen = seq.generator(len(out), Sequence.RNG_VERIFY)
    return [*out, int(torch.multinomial(probs[k], 1, generator=gen).item())]
