"""The torch references against naive dense attention with an explicit mask (float64 truth)."""

from __future__ import annotations

import pytest
import torch
from paged_cases import (
    cu_from_lens,
    dense_kv,
    naive_attention,
    random_block_tables,
    random_cache,
    rel_err,
)

import kernels
from kernels import reference
from kernels.reference import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8

DTYPES = [torch.float32, torch.bfloat16, FP8_DTYPE]
# Tolerance of the reference against float64 truth: it computes in fp32 from values that are
# exactly representable in the cache dtype, so only fp32 rounding (and the bf16 output cast) remain.
REF_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, FP8_DTYPE: 1e-5}


def _q_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if cache_dtype == FP8_DTYPE else cache_dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_reference_matches_naive(dtype, group, head_dim):
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    kv_heads, block_size = 2, 16
    seq_lens = [1, 17, 40, 5]  # ragged, not multiples of the block size
    n_q = [1, 3, 2, 1]  # several-token rows verify speculative tokens
    cache = random_cache(16, block_size, kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(seq_lens, block_size, 16, gen)
    q = torch.randn(sum(n_q), kv_heads * group, head_dim, generator=gen).to(_q_dtype(dtype))
    scale = head_dim**-0.5
    # the torch reference itself (kernels.decode_attention on CPU is the C++ kernel)
    out = reference.decode_attention(
        q, cache.k, cache.v, tables, torch.tensor(seq_lens, dtype=torch.int32),
        cu_from_lens(n_q), max(n_q), scale, cache.k_scale, cache.v_scale,
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == q.dtype
    cu = cu_from_lens(n_q).tolist()
    for b, (length, n) in enumerate(zip(seq_lens, n_q, strict=True)):
        k = dense_kv(cache.k, cache.k_scale, tables[b], length)
        v = dense_kv(cache.v, cache.v_scale, tables[b], length)
        q_pos = torch.arange(length - n, length)[:, None]  # [n, 1]
        mask = torch.arange(length)[None, :] <= q_pos  # [n, L]
        ref = naive_attention(q[cu[b] : cu[b + 1]], k, v, mask, scale)
        assert rel_err(out[cu[b] : cu[b + 1]], ref) < REF_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("q_lens", [[5, 1, 19, 12], [260, 7]])  # padded batch / per-sequence
def test_prefill_reference_matches_naive(dtype, group, prefix, q_lens):
    gen = torch.Generator().manual_seed(group * 10 + prefix)
    kv_heads, head_dim, block_size = 2, 64, 8
    ctx_lens = [9, 0, 16, 3][: len(q_lens)] if prefix else [0] * len(q_lens)
    cache = random_cache(16, block_size, kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(ctx_lens, block_size, 16, gen)
    n = sum(q_lens)
    new_dtype = _q_dtype(dtype)
    q = torch.randn(n, kv_heads * group, head_dim, generator=gen).to(new_dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=gen).to(new_dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=gen).to(new_dtype)
    cu = cu_from_lens(q_lens)
    scale = 0.125
    extra = {}
    if prefix:
        extra = dict(
            k_cache=cache.k, v_cache=cache.v, block_tables=tables,
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
            k_scale=cache.k_scale, v_scale=cache.v_scale,
        )  # fmt: skip
    out = kernels.prefill_attention(q, k, v, cu, max(q_lens), scale, **extra)
    assert out.shape == q.shape and out.dtype == q.dtype
    bounds = cu.tolist()
    for b, (s, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        lo, hi = bounds[b], bounds[b + 1]
        kb = torch.cat([dense_kv(cache.k, cache.k_scale, tables[b], c), k[lo:hi].double()])
        vb = torch.cat([dense_kv(cache.v, cache.v_scale, tables[b], c), v[lo:hi].double()])
        # query j at absolute position c + j attends to absolute positions 0 .. c + j
        mask = torch.arange(c + s)[None, :] <= (c + torch.arange(s))[:, None]  # [s, c + s]
        ref = naive_attention(q[lo:hi], kb, vb, mask, scale)
        assert rel_err(out[lo:hi], ref) < REF_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_reference_writes_slots_only(dtype):
    gen = torch.Generator().manual_seed(7)
    block_size, kv_heads, head_dim = 4, 3, 64
    cache = random_cache(6, block_size, kv_heads, head_dim, dtype, gen)
    before = cache.data.clone()
    slots = torch.tensor([5, -1, 0, 23, 11, -1, 12], dtype=torch.int64)
    key = torch.randn(len(slots), kv_heads, head_dim, generator=gen)
    value = torch.randn(len(slots), kv_heads, head_dim, generator=gen) * 3
    kernels.store_kv(key, value, cache.k, cache.v, slots, cache.k_scale, cache.v_scale)
    written = torch.zeros(6, block_size, dtype=torch.bool)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, block_size)
        written[blk, off] = True
        for src, view, sc in ((key, cache.k, cache.k_scale), (value, cache.v, cache.v_scale)):
            if dtype == FP8_DTYPE:
                got = dequantize_fp8(view[blk, off], sc[blk, off], torch.float32)
                amax = src[i].abs().amax(-1, keepdim=True)
                assert torch.equal(sc[blk, off], amax[:, 0] / FP8_MAX)
                # e4m3: 3 mantissa bits -> relative rounding <= 2^-4; subnormals: 2^-9 * scale
                assert ((got - src[i]).abs() <= src[i].abs() / 16 + amax / FP8_MAX / 512).all()
            else:
                assert torch.equal(view[blk, off], src[i].to(dtype))
    # nothing else moved: other slots of this layer, and every other layer
    untouched = ~written[:, None, None, :].expand(-1, 3, 2, -1).clone()
    untouched[:, [0, 2]] = True
    assert torch.equal(cache.data.view(torch.uint8)[untouched], before.view(torch.uint8)[untouched])


def test_quantize_fp8_roundtrip_and_zero_rows():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, 128, generator=gen) * torch.rand(64, 4, 1, generator=gen) * 50
    x[3, 1] = 0.0
    q, s = quantize_fp8(x)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (64, 4)
    assert torch.isfinite(s).all() and (s > 0).all()
    deq = dequantize_fp8(q, s, torch.float32)
    assert torch.equal(deq[3, 1], torch.zeros(128))
    # every row reaches +-448 exactly at its amax, so the full e4m3 range is used
    assert torch.equal(q.float().abs().amax(-1)[s > 1e-10], torch.full((64 * 4 - 1,), FP8_MAX))
    err = (deq - x).norm() / x.norm()
    assert err < 0.04, f"fp8 per-row RMS relative error {err:.4f}"
