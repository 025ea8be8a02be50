"""Triton varlen flash attention (interpreter, CPU tensors) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from paged_cases import cu_from_lens, random_block_tables, random_cache, rel_err

from kernels import reference, triton_prefill
from kernels.reference import FP8_DTYPE

# max|out - ref| / max|ref| allowed, per q dtype. fp32: summation order only. fp16: q, K, P and V
# enter the dot in fp16 (2^-11 relative each). bf16: fp32 under the interpreter, but its
# fp32 -> bf16 output cast truncates: up to 1 bf16 ulp (2^-7 relative).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
GQA_HEAD_DIM = [(1, 128), (3, 64), (4, 128)]
# Two KV heads where it matters (kv_head > 0 indexing), one for the widest group to save time.
KV_HEADS = {1: 2, 3: 2, 4: 1}


def _inputs(dtype, group, head_dim, q_lens, gen):
    kv_heads = KV_HEADS[group]
    n = sum(q_lens)
    q = torch.randn(n, kv_heads * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v, cu_from_lens(q_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("group", "head_dim"), GQA_HEAD_DIM)
@pytest.mark.parametrize("prefix", ["none", "cache", "fp8"])
def test_prefill_matches_reference(dtype, group, head_dim, prefix):
    gen = torch.Generator().manual_seed(group * 17 + head_dim)
    # ragged chunks; 33 spans three 16-query tiles; contexts not multiples of the block size
    q_lens, ctx_lens, block_size = [5, 1, 33, 12], [9, 0, 21, 16], 16
    q, k, v, cu = _inputs(dtype, group, head_dim, q_lens, gen)
    extra = {}
    if prefix != "none":
        cache_dtype = FP8_DTYPE if prefix == "fp8" else dtype
        cache = random_cache(8, block_size, KV_HEADS[group], head_dim, cache_dtype, gen)
        extra = dict(
            k_cache=cache.k, v_cache=cache.v,
            block_tables=random_block_tables(ctx_lens, block_size, 8, gen),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
            k_scale=cache.k_scale, v_scale=cache.v_scale,
        )  # fmt: skip
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    scale = head_dim**-0.5
    triton_prefill.prefill_attention(q, k, v, cu, max(q_lens), scale, out=out, **extra)
    ref = reference.prefill_attention(q, k, v, cu, max(q_lens), scale, **extra)
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e}"
