"""Test inputs for the kernels: strided per-layer cache views, block tables, naive attention.

Everything here is deliberately naive (explicit per-position loops, float64 dense attention with an
explicit mask) so it can serve as the ground truth for the vectorised references.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kernels.reference import FP8_DTYPE, quantize_fp8

ROOT = Path(__file__).resolve().parents[2]  # the repository
NUM_LAYERS = 3
LAYER = 1  # the slice under test: neither first nor last, so dim-0 strides matter


@dataclass(frozen=True)
class PagedCache:
    """One layer's views of a full [num_blocks, num_layers, 2, block_size, H, D] cache."""

    data: Tensor  # [num_blocks, num_layers, 2, block_size, H, D]
    scales: Tensor | None  # [num_blocks, num_layers, 2, block_size, H] float32 (FP8 only)

    @property
    def k(self) -> Tensor:
        return self.data[:, LAYER, 0]  # [num_blocks, block_size, H, D], strided in dim 0

    @property
    def v(self) -> Tensor:
        return self.data[:, LAYER, 1]

    @property
    def k_scale(self) -> Tensor | None:
        return None if self.scales is None else self.scales[:, LAYER, 0]  # [nb, bs, H]

    @property
    def v_scale(self) -> Tensor | None:
        return None if self.scales is None else self.scales[:, LAYER, 1]


def random_cache(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, gen
) -> PagedCache:
    """A cache full of random values (never zeros), FP8 with random per-row scales."""
    shape = (num_blocks, NUM_LAYERS, 2, block_size, kv_heads, head_dim)
    x = torch.randn(shape, generator=gen)
    if dtype != FP8_DTYPE:
        return PagedCache(x.to(dtype), None)
    # Vary the row magnitudes over two decades so a wrong scale cannot go unnoticed.
    x = x * torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-2.3, 2.3, generator=gen))
    q, s = quantize_fp8(x)
    return PagedCache(q, s)


def random_block_tables(lens: list[int], block_size: int, num_blocks: int, gen) -> Tensor:
    """int32 [B, max_blocks]: disjoint random blocks per sequence, padding entries -1."""
    need = [-(-n // block_size) for n in lens]
    assert sum(need) <= num_blocks, "not enough blocks for the case"
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(lens), max(max(need), 1)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    return table


def dense_kv(cache: Tensor, scale: Tensor | None, table_row: Tensor, length: int) -> Tensor:
    """Positions [0, length) of one sequence, read one slot at a time -> float64 [length, H, D]."""
    bs = cache.shape[1]
    rows = []
    for p in range(length):
        blk, off = int(table_row[p // bs]), p % bs
        row = cache[blk, off].double()
        if scale is not None:
            row = row * scale[blk, off].double()[:, None]
        rows.append(row)
    return torch.stack(rows) if rows else cache.new_zeros((0,) + cache.shape[2:]).double()


def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sm_scale: float) -> Tensor:
    """q [S, Hq, D], k/v [L, Hkv, D], mask bool [S, L] (True = attend) -> float64 [S, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,lhd->hsl", q.double(), k) * sm_scale  # [Hq, S, L]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hsl,lhd->shd", scores.softmax(-1), v)  # [S, Hq, D]


def cu_from_lens(lens: list[int]) -> Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|: one number per call, robust to near-zero entries."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
