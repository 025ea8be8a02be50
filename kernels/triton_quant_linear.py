"""Weight-only quantized linear layers in Triton (CUDA): y [M, N] = x [M, K] @ W^T, W int4 (Q4_1
blocks) or int8 (symmetric, group G), formats as in ``kernels/quant_reference.py``.

One program per [BLOCK_M, BLOCK_N] output tile walks K in BLOCK_K steps: it loads the quantized
weight tile, dequantizes it in registers (nibble / byte -> float, times the group's float16 scale,
plus the int4 minimum) and accumulates ``tl.dot`` in float32. Weights are read once per M tile,
so at decode sizes (M <= BLOCK_M) each quantized byte crosses the memory bus once: 4x (int8) or
~6x (int4) fewer bytes than bfloat16 weights. torch's own CUDA int4 kernel
(``_weight_int4pack_mm``) takes only bfloat16 activations with a tile-packed weight layout and
needs sm80; this one takes the same layout as the CPU path and runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import check_device, dot_dtype


@triton.jit
def _quant_linear_kernel(
    x_ptr,  # [M, K] activations (float32 / float16 / bfloat16), rows contiguous
    q_ptr,  # int4: uint8 [N, K / 2]; int8: int8 [N, K]; contiguous
    s_ptr,  # float16 [N, K / GROUP] scales, contiguous
    m_ptr,  # float16 [N, K / 32] int4 minimums (unused for int8)
    y_ptr,  # [M, N] output, x's dtype, rows contiguous
    M,
    N,
    K,
    stride_x,  # row strides of x and y
    stride_y,
    GROUP: tl.constexpr,  # weights per scale (int4: 32)
    INT4: tl.constexpr,  # int4 (Q4_1) or int8 weights
    DOT: tl.constexpr,  # operand dtype of tl.dot (triton_common.dot_dtype)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]  # fmt: skip
        wmask = mask_n[:, None] & mask_k[None, :]
        group = rk // GROUP
        scale = tl.load(s_ptr + rn[:, None] * (K // GROUP) + group[None, :], mask=wmask, other=0.0)
        if INT4:
            # element k of a row: byte 16 * (k // 32) + k % 16, high nibble when k % 32 >= 16
            byte = (rk // 32) * 16 + rk % 16
            b = tl.load(q_ptr + rn[:, None] * (K // 2) + byte[None, :], mask=wmask, other=0)
            nib = (b.to(tl.int32) >> (((rk % 32) // 16) * 4)[None, :]) & 0xF
            mn = tl.load(m_ptr + rn[:, None] * (K // 32) + (rk // 32)[None, :], mask=wmask,
                         other=0.0)  # fmt: skip
            w = nib.to(tl.float32) * scale.to(tl.float32) + mn.to(tl.float32)  # [BN, BK]
        else:
            q = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0)
            w = q.to(tl.float32) * scale.to(tl.float32)
        acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)), out_dtype=tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


def _launch(x, qweight, scales, mins, out, int4: bool, block_m, block_n, block_k) -> torch.Tensor:
    tensors = (x, qweight, scales) + (() if mins is None else (mins,))
    check_device(*tensors)
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [M, K] with contiguous rows {x.shape}"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype}"
    m, k = x.shape
    n = qweight.shape[0]
    assert qweight.is_contiguous() and scales.is_contiguous() and scales.dtype == torch.float16
    if int4:
        assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2) and k % 32 == 0
        assert mins is not None and mins.is_contiguous() and mins.dtype == torch.float16
        assert scales.shape == mins.shape == (n, k // 32), f"scales {scales.shape}"
        group = 32
    else:
        assert qweight.dtype == torch.int8 and qweight.shape == (n, k), f"qweight {qweight.shape}"
        assert scales.dim() == 2 and scales.shape[0] == n and k % scales.shape[1] == 0
        group = k // scales.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1
    if m == 0 or n == 0:
        return out
    block_m = block_m or max(16, min(64, triton.next_power_of_2(m)))
    block_n = block_n or 64
    block_k = block_k or 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_linear_kernel[grid](
        x, qweight, scales, mins if mins is not None else scales, out,
        m, n, k, x.stride(0), out.stride(0),
        GROUP=group, INT4=int4, DOT=dot_dtype(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def int4_linear(x, qweight, scales, mins, *, out=None, block_m=None, block_n=None, block_k=None):
    """Triton twin of ``quant_reference.int4_linear``."""
    return _launch(x, qweight, scales, mins, out, True, block_m, block_n, block_k)


def int8_linear(x, qweight, scales, *, out=None, block_m=None, block_n=None, block_k=None):
    """Triton twin of ``quant_reference.int8_linear``."""
    return _launch(x, qweight, scales, None, out, False, block_m, block_n, block_k)
