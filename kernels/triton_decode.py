"""Paged decode attention (flash-decoding): split-KV partial softmax, then a reduce over splits.

Grid ``(B, kv_heads, num_splits)``. A program owns one sequence, one KV head and one slice of the
sequence's positions, and computes ALL query rows that read that KV head: the n_b query tokens of
the sequence (1, or 1 + k speculative tokens) times the GQA group of query heads, stacked into one
tile so every K/V block is loaded once for all of them::

    tile row r = i * GROUP + g   ->  query token i of sequence b, query head kv_head * GROUP + g
    limit(r)   = seq_len - n_b + i + 1   (query i sees positions [0, limit); causal among drafts)

Positions are gathered through the block table per token (``pos // BLOCK_SIZE``), so BLOCK_N need
not equal the cache block size. FP8 codes are decoded with integer ops (any sm_80+ GPU); K scales
multiply the scores column-wise (fp32), V tiles are dequantized before the dot; both read one
scale per token and KV head.

With one split the program normalises and writes the output directly. With several, each writes
its normalised partial output and log-sum-exp (base 2), and ``_reduce_kernel`` merges them. The
split count comes from the cache capacity (block table width), never from ``seq_lens`` on the
host, so the launch does not synchronise with the GPU; splits past a sequence's end exit early.
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
    online_softmax_update,
    paged_offsets,
)

BLOCK_N = 32  # KV positions per inner step
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the reduce than it saves


@triton.jit
def _decode_kernel(
    q_ptr,  # [N, Hq, HEAD_DIM] queries, packed by cu_q
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, HEAD_DIM] strided view
    v_cache_ptr,  # same layout and strides
    k_scale_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp32 (FP8 only)
    v_scale_ptr,  # same layout and strides
    block_tables_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]: cached tokens including the queries
    cu_q_ptr,  # int32 [B + 1]: query rows of sequence b are cu_q[b] .. cu_q[b+1]
    out_ptr,  # [N, Hq, HEAD_DIM] output, or fp32 [N, Hq, NUM_SPLITS, HEAD_DIM] partials
    lse_ptr,  # fp32 [N, Hq, NUM_SPLITS] log2-sum-exp of each split (NUM_SPLITS > 1)
    sm_scale,  # softmax scale (1/sqrt(D) usually)
    stride_qn,  # q stride over tokens
    stride_qh,  # q stride over heads
    stride_cb,  # cache stride over blocks
    stride_sb,  # scale stride over blocks
    stride_bt,  # block table row stride
    stride_on,  # out stride over tokens
    stride_oh,  # out stride over heads
    stride_os,  # out stride over splits (partials only)
    split_size,  # positions per split, a multiple of BLOCK_N
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # tile rows >= max_query_len * GROUP, power of two, >= 16
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    num_q = tl.load(cu_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_size
    end = tl.minimum(start + split_size, seq_len)

    rows = tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP  # query token within the sequence
    heads = kv_head * GROUP + rows % GROUP  # [BLOCK_M] query heads
    row_ok = q_idx < num_q
    dims = tl.arange(0, HEAD_DIM)
    row_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    q_ptrs = q_ptr + (q_start + q_idx)[:, None] * stride_qn + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + dims[None, :], mask=row_mask, other=0.0).to(tl.float32)
    q = (q * (sm_scale * 1.4426950408889634)).to(DOT_DTYPE)  # log2 domain: exp2 below
    limit = seq_len - num_q + q_idx + 1  # [BLOCK_M] exclusive bound on visible positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt
    for pos0 in range(start, end, BLOCK_N):
        pos = pos0 + tl.arange(0, BLOCK_N)
        in_seq = pos < end
        kv_off, sc_off = paged_offsets(
            table_row, pos, in_seq, kv_head, stride_cb, stride_sb,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
        )  # fmt: skip
        kv_mask = in_seq[:, None] & (dims[None, :] < HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0)
        if FP8:
            k = e4m3_to_fp16_div256(k)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))  # [BLOCK_M, BLOCK_N] fp32
        if FP8:  # x256: the decoded codes are value / 256
            s = s * (tl.load(k_scale_ptr + sc_off, mask=in_seq, other=0.0) * 256.0)[None, :]
        visible = in_seq[None, :] & (pos[None, :] < limit[:, None])
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0)
        if FP8:
            v_scale = tl.load(v_scale_ptr + sc_off, mask=in_seq, other=0.0) * 256.0
            v = e4m3_to_fp16_div256(v).to(tl.float32) * v_scale[:, None]
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # an empty split contributes nothing
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + (q_start + q_idx)[:, None] * stride_on + heads[:, None] * stride_oh
    if NUM_SPLITS == 1:
        tl.store(o_ptrs + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(o_ptrs + split * stride_os + dims[None, :], out, mask=row_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        lse_off = ((q_start + q_idx) * (NUM_KV_HEADS * GROUP) + heads) * NUM_SPLITS + split
        tl.store(lse_ptr + lse_off, lse, mask=row_ok)


@triton.jit
def _reduce_kernel(
    partial_ptr,  # fp32 [N, Hq, NUM_SPLITS, HEAD_DIM] contiguous
    lse_ptr,  # fp32 [N, Hq, NUM_SPLITS] contiguous
    out_ptr,  # [N, Hq, HEAD_DIM]
    stride_on,  # out stride over tokens
    stride_oh,  # out stride over heads
    NUM_HEADS: tl.constexpr,  # query heads
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row = token * NUM_HEADS + head
    lse_ptrs = lse_ptr + row * NUM_SPLITS + splits
    lse = tl.load(lse_ptrs, mask=splits < NUM_SPLITS, other=-float("inf"))  # [SPLITS_PAD]
    weight = tl.math.exp2(lse - tl.max(lse, axis=0))  # [SPLITS_PAD]; split 0 is never empty
    mask = (splits[:, None] < NUM_SPLITS) & (dims[None, :] < HEAD_DIM)
    part = tl.load(
        partial_ptr + (row * NUM_SPLITS + splits[:, None]) * HEAD_DIM + dims[None, :],
        mask=mask,
        other=0.0,
    )  # [SPLITS_PAD, HEAD_DIM]
    out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + token * stride_on + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty)
    )


def default_num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, never splits shorter than MIN_SPLIT_TOKENS."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * num_sms, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(capacity, MIN_SPLIT_TOKENS), 64))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    sm_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of ``kernels.reference.decode_attention``. ``num_splits`` overrides the split
    heuristic (tests force both paths); ``out`` [N, Hq, D] is written in place if given."""
    check_device(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q)
    check_paged_cache(k_cache, v_cache)
    check_scales(k_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    assert k_cache.shape[3] == head_dim, f"q head_dim {head_dim} vs cache {k_cache.shape[3]}"
    assert num_heads % kv_heads == 0, f"kv_heads {kv_heads} must divide q heads {num_heads}"
    assert q.stride(-1) == 1, "q head_dim must be contiguous"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert block_tables.dtype == seq_lens.dtype == cu_seqlens_q.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch
    assert block_tables.stride(1) == 1, "block table rows must be contiguous"
    assert cu_seqlens_q.shape == (batch + 1,) and max_query_len >= 1
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    capacity = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, capacity, q.device)
    split_size = triton.cdiv(triton.cdiv(capacity, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(capacity, split_size)  # no split starts past the capacity
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if num_splits == 1:
        target, lse = out, out  # lse unused
        stride_os = 0
    else:
        target = torch.empty(
            (num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
        stride_os = target.stride(2)
    if fp8:  # raw e4m3 codes, decoded in the kernel (see triton_common)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache,
        k_scale if fp8 else q, v_scale if fp8 else q,
        block_tables, seq_lens, cu_seqlens_q, target, lse, sm_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_scale.stride(0) if fp8 else 0,
        block_tables.stride(0), target.stride(0), target.stride(1), stride_os, split_size,
        NUM_KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=max(16, triton.next_power_of_2(max_query_len * group)), BLOCK_N=BLOCK_N,
        NUM_SPLITS=num_splits, FP8=fp8, DOT_DTYPE=dot_dtype(q.dtype),
    )  # fmt: skip
    if num_splits > 1:
        _reduce_kernel[(num_tokens, num_heads)](
            target, lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out
