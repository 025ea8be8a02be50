"""Grammar masks on logits: the sampler's hook and the speculator's.

    mask_logits(logits, seqs)          rows of constrained sequences: refused tokens -> -inf
    constrain_drafts(state, drafts,    drafts cut at the first token the grammar refuses, and
                     rows, probs)      each verify row masked at the state it is sampled from

Cutting drafts loses nothing: the target, masked, gives a refused draft probability 0, so
verification would reject it and everything after it anyway.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.sequence import Sequence
    from engine.structured.grammar_state import GrammarState


def mask_logits(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """logits [B, V]; returns them unchanged if no sequence is constrained, else a copy with
    each constrained row masked by its grammar's next-token mask."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])  # [B, ceil(V/32)] int32
    for i in rows:
        seqs[i].grammar.fill_mask(bitmask, i)
    out = logits.clone()
    _apply(out, bitmask, rows)
    # A row with nothing left: min_tokens (keeping EOS and stop ids out) disagrees with a
    # grammar that allows only those now. The grammar wins: its tokens, uniformly weighted.
    banned = [i for i in rows if seqs[i].num_output_tokens < seqs[i].params.min_tokens]
    alive = torch.isfinite(out[banned]).any(dim=-1).tolist() if banned else []  # one sync
    dead = [i for i, ok in zip(banned, alive, strict=True) if not ok]
    if dead:
        out[dead] = 0.0
        _apply(out, bitmask, dead)
    return out


def constrain_drafts(
    state: GrammarState,
    drafts: list[int],
    rows: torch.Tensor,  # [1 + k, V] target logits: row j follows drafts[:j]
    draft_probs: torch.Tensor | None,  # [k, V] or None
) -> tuple[list[int], torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(drafts, rows, draft_probs) cut to the drafts the grammar accepts, plus the masked rows.
    The matcher is walked along the drafts and rolled back: it ends where it started."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(drafts) + 1, rows.shape[-1])
    num_ok = 0
    for j in range(len(drafts) + 1):
        state.fill_mask(bitmask, j)
        if j == len(drafts) or not state.accept(drafts[j]):
            break
        if state.terminated:  # a drafted stop token: leave it to the target's own row j
            state.rollback(1)
            break
        num_ok += 1
    state.rollback(num_ok)
    rows = rows[: num_ok + 1]
    masked = rows.clone()
    _apply(masked, bitmask[: num_ok + 1], list(range(num_ok + 1)))
    probs = None if draft_probs is None else draft_probs[:num_ok]
    return drafts[:num_ok], rows, probs, masked


def _apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    import xgrammar as xgr

    # the bitmask is built on the host; on a GPU the kernel wants it beside the logits
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), indices=rows
    )
