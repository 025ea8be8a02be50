"""Varlen causal flash attention (FlashAttention-2) with an optional paged, cached prefix.

Grid ``(cdiv(max_seqlen, BLOCK_M), B, Hq)``: a program owns BLOCK_M queries of one sequence and
one query head. Query j of sequence b sits at absolute position ctx_b + j and sees::

    | cached prefix 0 .. ctx_b-1 | new 0 .. tile_start-1 | new tile_start .. j |
      phase 1: paged, unmasked     phase 2: packed,         phase 3: packed, causal
      (FP8 scales applied)         unmasked                  mask (the diagonal)

Splitting the new keys at the tile start keeps the causal mask off every tile below the diagonal
(BLOCK_N divides BLOCK_M, so no tile straddles it). Scores are kept in log2 units (q is
pre-multiplied by sm_scale * log2(e)) so the softmax uses exp2. Tiles past a sequence's end
exit at once, so the grid can be sized from ``max_seqlen`` without reading ``cu_seqlens``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    check_device,
    check_paged_cache,
    check_scales,
    dot_dtype,
    e4m3_to_fp16_div256,
    interpreting,
    online_softmax_update,
    paged_offsets,
)


@triton.jit
def _prefill_kernel(
    q_ptr,  # [N, Hq, HEAD_DIM] new queries, packed by cu
    k_ptr,  # [N, Hkv, HEAD_DIM] new keys
    v_ptr,  # [N, Hkv, HEAD_DIM] new values
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, HEAD_DIM] strided view (HAS_PREFIX)
    v_cache_ptr,  # same layout and strides
    k_scale_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp32 (FP8 prefix only)
    v_scale_ptr,  # same layout and strides
    block_tables_ptr,  # int32 [B, max_blocks] (HAS_PREFIX)
    context_lens_ptr,  # int32 [B]: cached tokens before this chunk (HAS_PREFIX)
    cu_ptr,  # int32 [B + 1]: rows of sequence b are cu[b] .. cu[b+1]
    out_ptr,  # [N, Hq, HEAD_DIM]
    sm_scale,  # softmax scale
    stride_qn, stride_qh,  # q strides over tokens, heads
    stride_kn, stride_kh,  # k strides
    stride_vn, stride_vh,  # v strides
    stride_on, stride_oh,  # out strides
    stride_cb,  # cache stride over blocks
    stride_sb,  # scale stride over blocks
    stride_bt,  # block table row stride
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step; divides BLOCK_M
    HAS_PREFIX: tl.constexpr,
    FP8: tl.constexpr,  # the cached prefix is float8_e4m3fn with scales
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    tile_start = tile * BLOCK_M
    if tile_start >= q_len:
        return

    rows = tile_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the chunk
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    row_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    q = tl.load(
        q_ptr + (q_start + rows)[:, None] * stride_qn + head * stride_qh + dims[None, :],
        mask=row_mask,
        other=0.0,
    ).to(tl.float32)
    q = (q * (sm_scale * 1.4426950408889634)).to(DOT_DTYPE)  # log2 units for exp2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # phase 1: the cached prefix, read through the block table; all of it precedes every query
    if HAS_PREFIX:
        ctx = tl.load(context_lens_ptr + seq)
        table_row = block_tables_ptr + seq * stride_bt
        for pos0 in range(0, ctx, BLOCK_N):
            pos = pos0 + tl.arange(0, BLOCK_N)
            in_ctx = pos < ctx
            kv_off, sc_off = paged_offsets(
                table_row, pos, in_ctx, kv_head, stride_cb, stride_sb,
                NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
            )  # fmt: skip
            kv_mask = in_ctx[:, None] & (dims[None, :] < HEAD_DIM)
            k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0)
            if FP8:
                k = e4m3_to_fp16_div256(k)
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))  # [BLOCK_M, BLOCK_N]
            if FP8:  # x256: the decoded codes are value / 256
                s = s * (tl.load(k_scale_ptr + sc_off, mask=in_ctx, other=0.0) * 256.0)[None, :]
            s = tl.where(in_ctx[None, :], s, float("-inf"))
            v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0)
            if FP8:
                v_scale = tl.load(v_scale_ptr + sc_off, mask=in_ctx, other=0.0) * 256.0
                v = e4m3_to_fp16_div256(v).to(tl.float32) * v_scale[:, None]
            m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)

    # phases 2 and 3: the new keys of this chunk, packed like the queries
    k_base = k_ptr + q_start * stride_kn + kv_head * stride_kh
    v_base = v_ptr + q_start * stride_vn + kv_head * stride_vh
    for n0 in range(0, tile_start, BLOCK_N):  # strictly below the diagonal: no mask
        keys = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :])
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :])
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)
    diag_end = tl.minimum(tile_start + BLOCK_M, q_len)
    for n0 in range(tile_start, diag_end, BLOCK_N):  # the diagonal: causal mask
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < q_len
        kv_mask = key_ok[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))
        s = tl.where(key_ok[None, :] & (keys[None, :] <= rows[:, None]), s, float("-inf"))
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i > 0 on real rows (key j = j)
    o_ptrs = out_ptr + (q_start + rows)[:, None] * stride_on + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def default_blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a GPU launch: 128-query tiles amortise K/V loads; D=128
    halves BLOCK_N to stay within registers. The interpreter uses small tiles (fewer wasted rows
    on the tiny test shapes, and multi-tile paths get exercised)."""
    if interpreting():
        return 16, 16, 4
    return (128, 64, 4) if head_dim <= 64 else (128, 32, 8)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sm_scale: float,
    *,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    context_lens: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``kernels.reference.prefill_attention``. ``out`` [N, Hq, D] is written in
    place if given; ``block_m`` / ``block_n`` override the tile sizes (BLOCK_N divides BLOCK_M)."""
    check_device(q, k, v, cu_seqlens)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    batch = cu_seqlens.shape[0] - 1
    assert k.shape == v.shape == (num_tokens, kv_heads, head_dim), f"k {k.shape} v {v.shape}"
    assert num_heads % kv_heads == 0, f"kv_heads {kv_heads} must divide q heads {num_heads}"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert k.dtype == v.dtype == q.dtype, f"q {q.dtype} k {k.dtype} v {v.dtype}"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "head_dim must be contiguous"
    assert head_dim in (16, 32, 64, 128, 256), f"head_dim {head_dim}"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
    has_prefix = context_lens is not None and k_cache is not None
    fp8 = False
    if has_prefix:
        assert v_cache is not None and block_tables is not None
        check_device(q, k_cache, v_cache, block_tables, context_lens)
        check_paged_cache(k_cache, v_cache)
        check_scales(k_cache, k_scale, v_scale)
        assert k_cache.shape[2:] == (kv_heads, head_dim), f"cache {k_cache.shape} vs k {k.shape}"
        assert block_tables.dtype == context_lens.dtype == torch.int32
        assert block_tables.shape[0] == batch and block_tables.stride(1) == 1
        assert context_lens.shape == (batch,)
        fp8 = k_cache.dtype == torch.float8_e4m3fn
        if not fp8:
            assert k_cache.dtype == q.dtype, f"cache {k_cache.dtype} vs q {q.dtype}"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    bm, bn, num_warps = default_blocks(head_dim)
    bm, bn = block_m or bm, block_n or bn
    assert bm % bn == 0, f"BLOCK_N {bn} must divide BLOCK_M {bm}"
    # Without a prefix the cache arguments are never read; pass q so the pointers are valid.
    k_cache_, v_cache_ = (k_cache, v_cache) if has_prefix else (q, q)
    if fp8:  # raw e4m3 codes, decoded in the kernel (see triton_common)
        k_cache_, v_cache_ = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_scale_, v_scale_ = (k_scale, v_scale) if fp8 else (q, q)
    tables, ctx = (block_tables, context_lens) if has_prefix else (cu_seqlens, cu_seqlens)
    _prefill_kernel[(triton.cdiv(max_seqlen, bm), batch, num_heads)](
        q, k, v, k_cache_, v_cache_, k_scale_, v_scale_, tables, ctx, cu_seqlens, out, sm_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0) if has_prefix else 0, k_scale.stride(0) if fp8 else 0,
        block_tables.stride(0) if has_prefix else 0,
        NUM_KV_HEADS=kv_heads, GROUP=num_heads // kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1] if has_prefix else 1, BLOCK_M=bm, BLOCK_N=bn,
        HAS_PREFIX=has_prefix, FP8=fp8, DOT_DTYPE=dot_dtype(q.dtype), num_warps=num_warps,
    )  # fmt: skip
    return out
