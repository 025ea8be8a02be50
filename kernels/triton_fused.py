"""Fused elementwise Triton kernels: (residual add +) RMSNorm, SiLU-and-multiply, RoPE.

Each reads its inputs once and writes its outputs once (the torch versions make 3-6 passes over
memory with intermediates). Arithmetic is fp32 inside; values are rounded to the activation dtype
where ``kernels/fused_reference.py`` (HF Llama semantics) rounds them, so fp32 results match to
rounding and 16-bit ones to an ulp or two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import check_device


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [N, H] input (the sublayer output when HAS_RESIDUAL)
    residual_ptr,  # [N, H] residual stream (HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [N, H] normed output, dtype promote(weight, x)
    h_out_ptr,  # [N, H] x + residual, x's dtype (HAS_RESIDUAL)
    stride_x,  # row strides
    stride_r,
    stride_o,
    stride_h,
    eps,
    H: tl.constexpr,  # hidden size
    BLOCK_H: tl.constexpr,  # H rounded up to a power of two: one row per program
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounds like torch
        tl.store(h_out_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: cast, then weight
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_launch(x, residual, weight, eps, out, h_out) -> None:
    check_device(x, weight)
    num_rows, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), f"weight {tuple(weight.shape)}"
    assert x.stride(1) == 1 and out.stride(1) == 1, "rows must be contiguous"
    if num_rows == 0:
        return
    block_h = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out, h_out if h_out is not None else x,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        h_out.stride(0) if h_out is not None else 0, eps,
        H=hidden, BLOCK_H=block_h, HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block_h // 512)),
    )  # fmt: skip


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of ``fused_reference.rms_norm``."""
    if out is None:
        out = torch.empty(
            x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device
        )
    _rms_norm_launch(x, None, weight, eps, out, None)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``fused_reference.add_rms_norm``."""
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    if out is None:
        out = torch.empty(
            x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device
        )
    h_out = torch.empty_like(x) if h_out is None else h_out
    _rms_norm_launch(x, residual, weight, eps, out, h_out)
    return out, h_out


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [N, 2 * I]: gate columns first, then up
    out_ptr,  # [N, I]
    stride_in,  # row strides
    stride_out,
    INTER: tl.constexpr,  # I
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + INTER + cols, mask=mask, other=0.0)
    # torch rounds silu(gate) to the activation dtype before the multiply; so do we
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols,
        (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``fused_reference.silu_mul``."""
    check_device(gate_up)
    num_rows, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(1) == 1, f"gate_up {tuple(gate_up.shape)}"
    inter = width // 2
    if out is None:
        out = torch.empty((num_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (num_rows, inter) and out.stride(1) == 1
    if num_rows:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=block
        )
    return out


@triton.jit
def _rotary_kernel(
    x_ptr,  # [N, HEADS, HEAD_DIM] q or k
    out_ptr,  # [N, HEADS, HEAD_DIM] contiguous
    positions_ptr,  # int64 [N]
    cos_ptr,  # [P, HEAD_DIM] float32, halves equal
    sin_ptr,  # [P, HEAD_DIM] float32
    stride_xn,  # x strides over tokens and heads
    stride_xh,
    HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # HEADS rounded up to a power of two
    HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    half = HEAD_DIM // 2
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM // 2)
    mask = (heads[:, None] < HEADS) & (dims[None, :] < half)  # [HEADS_PAD, HALF]
    pos = tl.load(positions_ptr + token)
    dtype = x_ptr.dtype.element_ty
    # the reference casts the float32 tables to the activation dtype first
    c = tl.load(cos_ptr + pos * HEAD_DIM + dims).to(dtype).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * HEAD_DIM + dims).to(dtype).to(tl.float32)[None, :]
    base = x_ptr + token * stride_xn + heads[:, None] * stride_xh + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + (token * HEADS + heads[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(out, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(out + half, (x2 * c + x1 * s).to(dtype), mask=mask)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``fused_reference.rotary``."""
    check_device(q, k, positions, cos, sin)
    head_dim = q.shape[-1]
    assert k.shape[0] == q.shape[0] == positions.shape[0] and k.shape[-1] == head_dim
    assert positions.dtype == torch.int64
    assert cos.shape == sin.shape and cos.shape[1] == head_dim and cos.dtype == torch.float32
    assert cos.is_contiguous() and sin.is_contiguous() and head_dim % 2 == 0
    results = []
    for x in (q, k):
        assert x.stride(-1) == 1, "head_dim must be contiguous"
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x.shape[0]:
            heads = x.shape[1]
            _rotary_kernel[(x.shape[0],)](
                x, out, positions, cos, sin, x.stride(0), x.stride(1),
                HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads), HEAD_DIM=head_dim,
            )  # fmt: skip
        results.append(out)
    return results[0], results[1]
