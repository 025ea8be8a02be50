"""FP8 KV cache: accuracy against full precision, and proof that the scales reach the kernels."""

from __future__ import annotations

import pytest
import torch
from paged_cases import cu_from_lens, random_block_tables, random_cache, rel_err

from kernels import reference, triton_decode, triton_prefill, triton_store_kv
from kernels.reference import FP8_DTYPE

BLOCK_SIZE, KV_HEADS, GROUP, HEAD_DIM = 16, 2, 2, 64
# Attention over an FP8 cache vs the same K/V in fp32. e4m3 rounds each element by <= 2^-4
# relative (~2% RMS); K errors shift the logits, V errors pass straight through. On these inputs
# (unit q, K/V rows spread over two decades, so large-norm keys amplify their logit errors) the
# measured error, printed with -s, is 5.0% RMS (||diff|| / ||out||) and 5.9% at the worst element
# (max|diff| / max|out|) for decode, 5.2% / 10.8% for the prefill case. Other draws land around
# 3.7% / 6.1% (unit-scale rows) up to 6.5% / 15% (spread rows, 64 queries): see
# kernels.reference.quantize_fp8. Bounds for these fixed draws:
FP8_RMS_TOL = 0.08
FP8_MAX_TOL = 0.12


def _kv(n, gen):
    """K/V rows with per-row magnitudes over two decades (what per-row scales are for)."""
    mag = torch.exp(torch.empty(n, KV_HEADS, 1).uniform_(-2.3, 2.3, generator=gen))
    return (torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) * mag for _ in range(2))


def test_fp8_decode_accuracy_vs_full_precision():
    gen = torch.Generator().manual_seed(11)
    seq_lens, n_q = [45, 70, 9], [1, 2, 1]
    num_blocks = 12
    tables = random_block_tables(seq_lens, BLOCK_SIZE, num_blocks, gen)
    # slot of position p of sequence b, for every cached token
    slots = torch.cat([
        tables[b, torch.arange(n) // BLOCK_SIZE].long() * BLOCK_SIZE + torch.arange(n) % BLOCK_SIZE
        for b, n in enumerate(seq_lens)
    ])  # fmt: skip
    key, value = _kv(len(slots), gen)
    full = random_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.float32, gen)
    fp8 = random_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, FP8_DTYPE, gen)
    triton_store_kv.store_kv(key, value, full.k, full.v, slots)
    triton_store_kv.store_kv(key, value, fp8.k, fp8.v, slots, fp8.k_scale, fp8.v_scale)
    q = torch.randn(sum(n_q), KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    args = (tables, torch.tensor(seq_lens, dtype=torch.int32), cu_from_lens(n_q), max(n_q), 0.125)
    exact = triton_decode.decode_attention(q, full.k, full.v, *args, num_splits=2)
    approx = triton_decode.decode_attention(
        q, fp8.k, fp8.v, *args, fp8.k_scale, fp8.v_scale, num_splits=2
    )
    err_max = rel_err(approx, exact)
    err_rms = float((approx - exact).norm() / exact.norm())
    print(f"\nFP8 KV decode attention vs fp32: rel err RMS {err_rms:.4f}, max {err_max:.4f}")
    assert 1e-3 < err_rms < FP8_RMS_TOL  # nonzero: the FP8 path really was quantized
    assert err_max < FP8_MAX_TOL


def _decode_case(gen):
    seq_lens, n_q = [40, 23], [1, 3]
    cache = random_cache(6, BLOCK_SIZE, KV_HEADS, HEAD_DIM, FP8_DTYPE, gen)
    tables = random_block_tables(seq_lens, BLOCK_SIZE, 6, gen)
    q = torch.randn(sum(n_q), KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    args = (tables, torch.tensor(seq_lens, dtype=torch.int32), cu_from_lens(n_q), max(n_q), 0.125)
    return q, cache, tables, args


@pytest.mark.parametrize("which", ["k", "v"])
def test_decode_reads_scales(which):
    """A 1.25x error in ONE token's scale of one head must show (fp32 q: tolerance 2e-5)."""
    q, cache, tables, args = _decode_case(torch.Generator().manual_seed(5))
    ks, vs = cache.k_scale.clone(), cache.v_scale.clone()
    ref = reference.decode_attention(q, cache.k, cache.v, *args, ks, vs)
    good = triton_decode.decode_attention(q, cache.k, cache.v, *args, ks, vs)
    assert rel_err(good, ref) < 2e-5
    blk = int(tables[1, 1])  # position 16 + 3 of sequence 1, which every query sees
    (ks if which == "k" else vs)[blk, 3, 1] *= 1.25
    bad = triton_decode.decode_attention(q, cache.k, cache.v, *args, ks, vs)
    assert rel_err(bad, ref) > 1e-3


@pytest.mark.parametrize("which", ["k", "v"])
def test_prefill_reads_prefix_scales(which):
    gen = torch.Generator().manual_seed(9)
    q_lens, ctx_lens = [7, 20], [18, 5]
    cache = random_cache(6, BLOCK_SIZE, KV_HEADS, HEAD_DIM, FP8_DTYPE, gen)
    tables = random_block_tables(ctx_lens, BLOCK_SIZE, 6, gen)
    n = sum(q_lens)
    q = torch.randn(n, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    k, v = torch.randn(2, n, KV_HEADS, HEAD_DIM, generator=gen)
    cu = cu_from_lens(q_lens)
    ks, vs = cache.k_scale.clone(), cache.v_scale.clone()
    common = dict(
        k_cache=cache.k, v_cache=cache.v, block_tables=tables,
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
    )  # fmt: skip
    ref = reference.prefill_attention(q, k, v, cu, 20, 0.125, k_scale=ks, v_scale=vs, **common)
    good = triton_prefill.prefill_attention(
        q, k, v, cu, 20, 0.125, k_scale=ks, v_scale=vs, **common
    )
    assert rel_err(good, ref) < 2e-5
    (ks if which == "k" else vs)[int(tables[0, 1]), 1, 0] *= 1.25  # position 17 of sequence 0
    bad = triton_prefill.prefill_attention(q, k, v, cu, 20, 0.125, k_scale=ks, v_scale=vs, **common)
    assert rel_err(bad[:7], ref[:7]) > 1e-3


def test_fp8_prefix_prefill_accuracy_vs_full_precision():
    """Chunked prefill over an FP8 prefix vs the same prefix kept in fp32 (same bounds)."""
    gen = torch.Generator().manual_seed(12)
    q_lens, ctx_lens, num_blocks = [9, 24], [40, 57], 10
    tables = random_block_tables(ctx_lens, BLOCK_SIZE, num_blocks, gen)
    slots = torch.cat([
        tables[b, torch.arange(n) // BLOCK_SIZE].long() * BLOCK_SIZE + torch.arange(n) % BLOCK_SIZE
        for b, n in enumerate(ctx_lens)
    ])  # fmt: skip
    key, value = _kv(len(slots), gen)
    full = random_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.float32, gen)
    fp8 = random_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, FP8_DTYPE, gen)
    triton_store_kv.store_kv(key, value, full.k, full.v, slots)
    triton_store_kv.store_kv(key, value, fp8.k, fp8.v, slots, fp8.k_scale, fp8.v_scale)
    n = sum(q_lens)
    q = torch.randn(n, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    k, v = _kv(n, gen)
    cu, ctx = cu_from_lens(q_lens), torch.tensor(ctx_lens, dtype=torch.int32)
    common = dict(block_tables=tables, context_lens=ctx)
    exact = triton_prefill.prefill_attention(
        q, k, v, cu, 24, 0.125, k_cache=full.k, v_cache=full.v, **common
    )
    approx = triton_prefill.prefill_attention(
        q, k, v, cu, 24, 0.125, k_cache=fp8.k, v_cache=fp8.v,
        k_scale=fp8.k_scale, v_scale=fp8.v_scale, **common,
    )  # fmt: skip
    err_max = rel_err(approx, exact)
    err_rms = float((approx - exact).norm() / exact.norm())
    print(f"\nFP8 prefix prefill attention vs fp32: rel err RMS {err_rms:.4f}, max {err_max:.4f}")
    assert 1e-3 < err_rms < FP8_RMS_TOL and err_max < FP8_MAX_TOL
