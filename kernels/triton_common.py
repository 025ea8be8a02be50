"""Pieces shared by the Triton kernels: FP8 rounding, dtype choices, host-side checks.

Importing this module imports triton; ``kernels/__init__.py`` only does so on the first CUDA call
(or when a test asks), so TRITON_INTERPRET must already be set by then for CPU runs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of tl.dot: the activations' 16-bit type on GPU (tensor cores), fp32 for fp32.

    The interpreter's tl.dot on bf16 operands returns garbage, so under TRITON_INTERPRET bf16 is
    computed in fp32: the same algorithm, with a little more precision than the GPU path. FP8
    caches are decoded to fp16 and then cast to this dtype (exact: e4m3 fits in both).
    """
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def check_device(*tensors: torch.Tensor) -> None:
    """CUDA tensors on one device, or CPU tensors under the interpreter."""
    dev = tensors[0].device
    for t in tensors:
        assert t.device == dev, f"tensors on {t.device} and {dev}"
    assert dev.type == "cuda" or interpreting(), "Triton kernels need CUDA (or TRITON_INTERPRET=1)"


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """[num_blocks, block_size, H, D] views whose inner three dims are contiguous; K and V alike."""
    assert k_cache.dim() == 4, f"cache must be [num_blocks, block_size, H, D], got {k_cache.shape}"
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.stride() == v_cache.stride(), "K and V views must share strides"
    _, bs, h, d = k_cache.shape
    assert k_cache.stride()[1:] == (h * d, d, 1), "inner three cache dims must be contiguous"
    assert d in (16, 32, 64, 128, 256), f"head_dim {d} must be a power of two in [16, 256]"


def check_scales(cache: torch.Tensor, *scales: torch.Tensor | None) -> None:
    """FP8 caches need float32 [num_blocks, block_size, H] scales; other caches none."""
    if cache.dtype != torch.float8_e4m3fn:
        assert all(s is None for s in scales), "scales given for a non-FP8 cache"
        return
    first = scales[0]
    for s in scales:
        assert s is not None, "FP8 cache needs k_scale and v_scale"
        assert s.dtype == torch.float32 and s.shape == cache.shape[:3], f"bad scale {s.shape}"
        assert s.stride()[1:] == (cache.shape[2], 1), "inner two scale dims must be contiguous"
        assert s.stride() == first.stride(), "k_scale and v_scale views must share strides"


# FP8 in the kernels travels as raw uint8 codes, encoded and decoded with integer ops below:
# Triton's float8e4nv type only compiles for sm_89+, and this way A100-class GPUs (and the
# interpreter, whose fp8 casts round differently from torch) run the same code bit for bit.


@triton.jit
def e4m3_to_fp16_div256(code):
    """uint8 e4m3 codes -> fp16 holding exactly value / 256 (subnormals included; callers fold the
    256 into the scale). e4m3 is s.eeee.mmm with bias 7, fp16 s.eeeee.mmmmmmmmmm with bias 15:
    placing the 7 magnitude bits at fp16 bits 13..7 gives 2^(e-15) * 1.m = value * 2^-8."""
    c = code.to(tl.uint16)
    return (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def e4m3_encode(y):
    """fp32 ``y`` already on the e4m3 grid (see ``round_to_e4m3``) -> its uint8 code, exactly."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    exponent = ((bits >> 23) & 0xFF) - 127
    normal = ((exponent + 7) << 3) | ((bits >> 20) & 0x7)  # top 3 mantissa bits
    subnormal = (tl.abs(y) * 512.0).to(tl.int32)  # below 2^-6: multiples of 2^-9
    return (tl.where(exponent >= -6, normal, subnormal) | sign).to(tl.uint8)


@triton.jit
def round_to_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest-even float8_e4m3fn value, in fp32.

    Encoding it is then exact, independent of any backend's fp32 -> fp8 rounding. e4m3 keeps 3
    mantissa bits; below 2^-6 it is subnormal with a fixed step of 2^-9. Adding and subtracting
    1.5 * 2^23 * step rounds to a multiple of step with the FPU's round-to-nearest-even.
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3's smallest normal exponent
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 3)
    magic = step * 12582912.0  # 1.5 * 2^23
    return (y + magic) - magic


@triton.jit
def paged_offsets(
    table_row_ptr,  # int32 block ids of one sequence
    pos,  # [BLOCK_N] token positions in the sequence
    in_range,  # [BLOCK_N] positions that exist
    kv_head,
    stride_cb,  # cache stride over blocks
    stride_sb,  # scale stride over blocks
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets of K/V rows and of their scales for ``pos`` read through a block table."""
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    slot_in_block = pos % BLOCK_SIZE
    kv_off = block * stride_cb + (slot_in_block * NUM_KV_HEADS + kv_head) * HEAD_DIM  # [BLOCK_N]
    scale_off = block * stride_sb + slot_in_block * NUM_KV_HEADS + kv_head  # [BLOCK_N]
    return kv_off, scale_off


@triton.jit
def online_softmax_update(
    s,  # [BLOCK_M, BLOCK_N] fp32 scores in log2 units, -inf where masked
    v,  # [BLOCK_N, HEAD_DIM] values (any float dtype, cast for the dot)
    m_i,  # [BLOCK_M] running max
    l_i,  # [BLOCK_M] running sum of exp2(s - m_i)
    acc,  # [BLOCK_M, HEAD_DIM] fp32 running sum of p @ v
    DOT_DTYPE: tl.constexpr,
):
    """One FlashAttention-2 step: rescale what was accumulated to the new max and add this tile.

    Rows that have seen only masked scores keep m = -inf; exponentiating against 0 instead keeps
    them at exactly zero weight rather than NaN (-inf - -inf).
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)  # [BLOCK_M]
    p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
    return m_new, l_i, acc
