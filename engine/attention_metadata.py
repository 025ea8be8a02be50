"""The batch description that every attention layer of one forward pass shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors for one step. A step is either a prefill step or a decode step.

    Prefill (``is_prefill``): the new tokens of B sequences are packed back to back::

        tokens   | seq 0 chunk | seq 1 chunk | ... |
        cu_seqlens 0           c0            c0+c1 ...

    and sequence b's chunk starts at absolute position ``context_lens[b]`` (tokens already in the
    paged cache: an earlier chunk or a prefix-cache hit).

    Decode: sequence b contributes ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` query tokens (1, or
    1 + k when verifying k speculative tokens), all already written to the cache by the time
    attention runs; ``seq_lens[b]`` counts every cached token including them.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # int64 [N]: cache slot of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    cu_seqlens: torch.Tensor  # int32 [B+1] (prefill: keys = queries; decode: queries)
    max_seqlen: int  # longest chunk (prefill) / most queries of one sequence (decode)
    context_lens: torch.Tensor | None = None  # int32 [B]; prefill only, None if all zero
    seq_lens: torch.Tensor | None = None  # int32 [B]; decode only
