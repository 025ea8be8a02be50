"""Triton paged decode attention (interpreter, CPU tensors) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from paged_cases import cu_from_lens, random_block_tables, random_cache, rel_err

from kernels import reference, triton_decode
from kernels.reference import FP8_DTYPE

# max|out - ref| / max|ref| allowed, per cache dtype. fp32: summation order only. fp16: q, P and
# K/V enter the dot in fp16 (2^-11 relative each). bf16: computed in fp32 under the interpreter,
# but the interpreter's fp32 -> bf16 output cast truncates: up to 1 bf16 ulp (2^-7 relative).
# FP8 cache (q fp16): the same cache values on both sides, so the fp16 bound applies.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2, FP8_DTYPE: 4e-3}
# q / output dtype per cache dtype
Q_DTYPE = {torch.float32: torch.float32, torch.float16: torch.float16}
Q_DTYPE |= {torch.bfloat16: torch.bfloat16, FP8_DTYPE: torch.float16}


def _case(dtype, group, head_dim, seq_lens, n_q, block_size=16, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    cache = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    q = torch.randn(sum(n_q), kv_heads * group, head_dim, generator=gen).to(Q_DTYPE[dtype])
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, cache, tables, lens, cu_from_lens(n_q)


def _run_both(q, cache, tables, lens, cu, max_q, num_splits, k_scale=None, v_scale=None):
    scale = q.shape[-1] ** -0.5
    ks = cache.k_scale if k_scale is None else k_scale
    vs = cache.v_scale if v_scale is None else v_scale
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    triton_decode.decode_attention(
        q, cache.k, cache.v, tables, lens, cu, max_q, scale, ks, vs,
        num_splits=num_splits, out=out,
    )  # fmt: skip
    ref = reference.decode_attention(
        q, cache.k, cache.v, tables, lens, cu, max_q, scale, cache.k_scale, cache.v_scale
    )
    return out, ref


# Every GQA ratio and head_dim, each with every cache dtype (the interpreter is too slow for the
# full product, and head_dim only changes the tile width).
GQA_HEAD_DIM = [(1, 128), (3, 64), (4, 128), (4, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE]
# Two KV heads where it matters (kv_head > 0 indexing), one for the widest group to save time.
KV_HEADS = {1: 2, 3: 2, 4: 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "head_dim"), GQA_HEAD_DIM)
def test_decode_matches_reference(dtype, group, head_dim):
    # ragged, not block multiples; 1 + 2 and 1 + 1 speculative rows; a 1-token sequence
    seq_lens, n_q = [37, 1, 50, 16], [3, 1, 1, 2]
    case = _case(
        dtype, group, head_dim, seq_lens, n_q, kv_heads=KV_HEADS[group], seed=group * 131 + head_dim
    )
    # two splits of 32 positions (block tables 4 x 16 wide): sequences end in either split
    for num_splits in (1, 2):
        out, ref = _run_both(*case, max(n_q), num_splits)
        assert not out.isnan().any()
        err = rel_err(out, ref)
        assert err < TOL[dtype], f"splits={num_splits}: rel err {err:.2e}"


@pytest.mark.parametrize("block_size", [8, 64])  # tiles spanning several blocks / within one
def test_decode_other_block_sizes(block_size):
    seq_lens, n_q = [37, 70], [2, 1]
    case = _case(torch.float32, 3, 64, seq_lens, n_q, block_size=block_size, seed=block_size)
    out, ref = _run_both(*case, max(n_q), 2)
    assert rel_err(out, ref) < TOL[torch.float32]
