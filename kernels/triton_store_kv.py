"""Reshape-and-cache: write new K/V rows into the paged cache through a slot mapping.

One program per token writes all KV heads of K and V. For an FP8 cache it quantizes each
(token, head) row of D values with its own scale (why per row: see
``kernels.reference.quantize_fp8``) and writes the scale next to it. The quantization is the
reference's, op for op in fp32: amax, scale = max(amax, 1e-12) / 448, y = x / scale (correctly
rounded, ``div_rn``), clamp to +-448, round to the e4m3 grid in fp32, then an exact integer
encode. So the FP8 bytes and the scales equal torch's bit for bit (tested under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    check_device,
    check_paged_cache,
    check_scales,
    e4m3_encode,
    round_to_e4m3,
)


@triton.jit
def _quantize_store(
    x,  # [HEADS_PAD, HEAD_DIM] fp32 rows of one token
    cache_ptrs,  # [HEADS_PAD, HEAD_DIM] destination pointers
    scale_ptrs,  # [HEADS_PAD] destination pointers of the per-row scales
    mask,  # [HEADS_PAD, HEAD_DIM] real head and valid slot
    row_mask,  # [HEADS_PAD]
    FP8: tl.constexpr,
):
    if FP8:  # literals: 1e-12 = reference.AMAX_FLOOR, 448 = reference.FP8_MAX (e4m3 max)
        amax = tl.max(tl.abs(x), axis=1)  # [HEADS_PAD]
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
        y = tl.math.div_rn(x, scale[:, None])
        y = round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
        tl.store(cache_ptrs, e4m3_encode(y), mask=mask)  # cache_ptrs: uint8 view
        tl.store(scale_ptrs, scale, mask=row_mask)
    else:
        tl.store(cache_ptrs, x.to(cache_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [N, NUM_HEADS, HEAD_DIM] new keys
    value_ptr,  # [N, NUM_HEADS, HEAD_DIM] new values
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM] strided view
    v_cache_ptr,  # same layout and strides as k_cache
    k_scale_ptr,  # [num_blocks, BLOCK_SIZE, NUM_HEADS] fp32 (FP8 only, else any pointer)
    v_scale_ptr,  # same layout and strides as k_scale
    slot_ptr,  # int64 [N]: block_id * BLOCK_SIZE + offset, negative = skip
    stride_kn,  # key stride over tokens
    stride_kh,  # key stride over heads
    stride_vn,  # value stride over tokens
    stride_vh,  # value stride over heads
    stride_cb,  # cache stride over blocks (spans all layers of a block)
    stride_sb,  # scale stride over blocks
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    NUM_HEADS: tl.constexpr,  # KV heads
    HEADS_PAD: tl.constexpr,  # NUM_HEADS rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    FP8: tl.constexpr,  # quantize and write scales
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)  # int64: offsets below cannot overflow
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    # Compare as vectors: the interpreter rejects a scalar bool combined with a vector bool.
    row_mask = (heads < NUM_HEADS) & ((heads * 0 + slot) >= 0)  # [HEADS_PAD]
    mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)  # [HEADS_PAD, HEAD_DIM]
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    # inner three cache dims are contiguous: [BLOCK_SIZE, NUM_HEADS, HEAD_DIM]
    cache_off = (
        block * stride_cb + (offset * NUM_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :]
    )  # [HEADS_PAD, HEAD_DIM]
    scale_off = block * stride_sb + offset * NUM_HEADS + heads  # [HEADS_PAD]
    k = tl.load(
        key_ptr + token * stride_kn + heads[:, None] * stride_kh + dims[None, :], mask=mask
    ).to(tl.float32)
    v = tl.load(
        value_ptr + token * stride_vn + heads[:, None] * stride_vh + dims[None, :], mask=mask
    ).to(tl.float32)
    _quantize_store(k, k_cache_ptr + cache_off, k_scale_ptr + scale_off, mask, row_mask, FP8)
    _quantize_store(v, v_cache_ptr + cache_off, v_scale_ptr + scale_off, mask, row_mask, FP8)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton twin of ``kernels.reference.store_kv`` (same arguments, same effect)."""
    check_device(key, value, k_cache, v_cache, slot_mapping)
    check_paged_cache(k_cache, v_cache)
    check_scales(k_cache, k_scale, v_scale)
    _, block_size, num_heads, head_dim = k_cache.shape
    num_tokens = key.shape[0]
    assert key.shape == value.shape == (num_tokens, num_heads, head_dim), (
        f"key {tuple(key.shape)} / value {tuple(value.shape)} vs cache heads {num_heads}, "
        f"head_dim {head_dim}"
    )
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (num_tokens,)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        assert key.dtype == k_cache.dtype, f"key {key.dtype} into a {k_cache.dtype} cache"
    if num_tokens == 0:
        return
    scale_k = k_scale if fp8 else k_cache  # unused pointer when not FP8
    scale_v = v_scale if fp8 else v_cache
    if fp8:  # the kernel writes raw e4m3 codes (see triton_common)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, scale_k, scale_v, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_scale.stride(0) if fp8 else 0,
        BLOCK_SIZE=block_size, NUM_HEADS=num_heads,
        HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim, FP8=fp8,
    )  # fmt: skip
