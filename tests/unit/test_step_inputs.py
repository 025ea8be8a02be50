"""build_step_inputs against the definitions in its docstring and AttentionMetadata's, position by
position, for prefill chunks that cross block boundaries and decode steps of 1 or 1 + k tokens."""

from __future__ import annotations

import random

import pytest
import torch

from engine.step_inputs import build_step_inputs

BS = 16


def make_case(rng: random.Random, prefill: bool, batch: int):
    chunks, starts, tables = [], [], []
    for _ in range(batch):
        start = rng.choice([0, 0, 5, 16, 31]) if prefill else rng.randint(0, 90)
        n = rng.randint(1, 70) if prefill else rng.choice([1, 1, 4])  # 4: 1 + 3 speculative
        chunks.append([rng.randrange(49152) for _ in range(n)])
        starts.append(start)
        blocks = -(-(start + n) // BS) + rng.randint(0, 2)  # lookahead blocks beyond the chunk
        tables.append(rng.sample(range(1000), blocks))
    return chunks, starts, tables


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_inputs_follow_the_definitions(prefill, batch):
    rng = random.Random(batch * 2 + prefill)
    chunks, starts, tables = make_case(rng, prefill, batch)
    ids, positions, md = build_step_inputs(chunks, starts, tables, prefill, BS, torch.device("cpu"))
    want_pos = [s + i for s, c in zip(starts, chunks, strict=True) for i in range(len(c))]
    want_slots = [
        t[(s + i) // BS] * BS + (s + i) % BS
        for s, c, t in zip(starts, chunks, tables, strict=True)
        for i in range(len(c))
    ]
    assert ids.dtype == positions.dtype == md.slot_mapping.dtype == torch.long
    assert ids.tolist() == [t for c in chunks for t in c]
    assert positions.tolist() == want_pos
    assert md.slot_mapping.tolist() == want_slots
    width = max(len(t) for t in tables)
    assert md.block_tables.dtype == torch.int32 and md.block_tables.shape == (batch, width)
    for row, t in zip(md.block_tables.tolist(), tables, strict=True):
        assert row[: len(t)] == t and row[len(t) :] == [0] * (width - len(t))
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + len(c))
    assert md.cu_seqlens.dtype == torch.int32 and md.cu_seqlens.tolist() == cu
    assert md.max_seqlen == max(len(c) for c in chunks)
    assert md.is_prefill == prefill
    if prefill:
        assert md.seq_lens is None
        if any(starts):
            assert md.context_lens.dtype == torch.int32 and md.context_lens.tolist() == starts
        else:
            assert md.context_lens is None
    else:
        assert md.context_lens is None
        assert md.seq_lens.dtype == torch.int32
        assert md.seq_lens.tolist() == [s + len(c) for s, c in zip(starts, chunks, strict=True)]


def test_tensors_own_their_memory_after_the_lists_are_gone():
    """The tensors are made through array buffers: they must stay valid and independent."""
    chunks, starts, tables = [[5, 6, 7]], [14], [[3, 9]]
    first = build_step_inputs(chunks, starts, tables, True, BS, torch.device("cpu"))
    second = build_step_inputs([[1]], [0], [[4]], True, BS, torch.device("cpu"))
    assert first[2].slot_mapping.tolist() == [3 * BS + 14, 3 * BS + 15, 9 * BS]
    assert second[2].slot_mapping.tolist() == [4 * BS]
    assert first[0].tolist() == [5, 6, 7] and first[1].tolist() == [14, 15, 16]
