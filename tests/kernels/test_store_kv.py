"""Triton store_kv (interpreter, CPU tensors) against the torch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from paged_cases import random_cache

from kernels import reference, triton_store_kv
from kernels.reference import FP8_DTYPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(1, 64), (3, 64), (2, 128)])
def test_store_kv_matches_reference(dtype, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(kv_heads * 7 + head_dim)
    block_size, num_blocks = 16, 5
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:11].to(torch.int64)
    slots[[2, 7]] = -1  # padding rows are skipped
    src_dtype = torch.float32 if dtype == FP8_DTYPE else dtype
    # magnitudes over four decades per row, and one all-zero row (scale floor)
    mag = torch.exp(torch.empty(11, kv_heads, 1).uniform_(-4.6, 4.6, generator=gen))
    key = (torch.randn(11, kv_heads, head_dim, generator=gen) * mag).to(src_dtype)
    value = (torch.randn(11, kv_heads, head_dim, generator=gen) * mag).to(src_dtype)
    key[4, 0] = 0.0
    got = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    want = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    want.data.copy_(got.data)
    if dtype == FP8_DTYPE:
        want.scales.copy_(got.scales)

    triton_store_kv.store_kv(key, value, got.k, got.v, slots, got.k_scale, got.v_scale)
    reference.store_kv(key, value, want.k, want.v, slots, want.k_scale, want.v_scale)

    # Bytes, not values: FP8 codes and fp32 scales must be identical, NaN-safe, all layers.
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    if dtype == FP8_DTYPE:
        assert torch.equal(got.scales, want.scales)


def test_store_kv_rejects_mismatched_heads():
    cache = random_cache(2, 4, 2, 64, torch.float32, torch.Generator().manual_seed(0))
    key = torch.randn(3, 3, 64)
    with pytest.raises(AssertionError, match="cache heads"):
        triton_store_kv.store_kv(key, key, cache.k, cache.v, torch.arange(3))
