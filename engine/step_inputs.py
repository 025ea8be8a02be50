"""Packed model inputs for one forward pass over the paged cache (target or draft model)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.attention_metadata import AttentionMetadata


def build_step_inputs(
    chunks: Seq[Seq[int]],  # tokens to compute, per sequence
    starts: Seq[int],  # absolute position of each chunk's first token
    block_tables: Seq[Seq[int]],  # each sequence's blocks (covering start + len(chunk) slots)
    is_prefill: bool,
    block_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids [N], positions [N], AttentionMetadata) for sequences packed back to back.

    Prefill: chunk b attends causally to itself and to the ``starts[b]`` tokens cached before it.
    Decode: the chunk's tokens (1, or 1 + speculative) are stored first, then attend to all
    ``starts[b] + len(chunk)`` cached tokens, causally among themselves.
    """
    lens = [len(c) for c in chunks]
    ids = [t for c in chunks for t in c]
    pos = [p for s, n in zip(starts, lens, strict=True) for p in range(s, s + n)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros((len(chunks), max_blocks), dtype=torch.int32)
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    positions = torch.tensor(pos, dtype=torch.long)
    seq_index = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lens))
    # slot of position p of sequence i = block_tables[i, p // bs] * bs + p % bs
    slots = tables[seq_index, positions // block_size].long() * block_size + positions % block_size
    common = dict(
        slot_mapping=slots.to(device),
        block_tables=tables.to(device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        max_seqlen=max(lens),
    )
    if is_prefill:
        ctx = torch.tensor(list(starts), dtype=torch.int32, device=device) if any(starts) else None
        md = AttentionMetadata(is_prefill=True, context_lens=ctx, **common)
    else:
        seq_lens = [s + n for s, n in zip(starts, lens, strict=True)]
        md = AttentionMetadata(
            is_prefill=False,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            **common,
        )
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    return input_ids, positions.to(device), md
