"""Weight-only quantized linear layers: the formats, quantizers and plain-torch references.

Two formats, both row-wise (each output row n quantized on its own, so the q/k/v and gate/up
weights of a layer concatenate along rows without requantizing):

``int4`` (llama.cpp's Q4_1 block, so a GGUF's Q4_1 tensors load bit for bit):
    qweight uint8 [N, K / 2]   groups of 32 along K; in group g of row n, byte j (0..15) holds
                               q[32g + j] in its low nibble and q[32g + 16 + j] in its high one
    scales  float16 [N, K / 32]  d
    mins    float16 [N, K / 32]  m;  w[n, 32g + i] = d[n, g] * q + m[n, g],  q in 0..15

``int8`` (symmetric, group size G dividing K; G = K is per channel, G = 32 is llama.cpp's Q8_0):
    qweight int8 [N, K]
    scales  float16 [N, K / G];   w[n, k] = scales[n, k // G] * q[n, k],  q in -127..127

Activations stay in the model's dtype (float32 or bfloat16) and products are accumulated in
float32: only the weights are quantized. So an ``int4`` model loaded from a Q4_1 GGUF computes
with exactly the weights a float32 model dequantizes from that file. The exception, on request
(``model.quantize_activations``): ``int4_linear_a8`` / ``int8_linear_a8`` round the activations
to int8 too (below).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

INT4_GROUP = 32


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] (K % 32 == 0) -> (qweight, scales, mins) as above, Q4_1's rounding: d = (max -
    min) / 15 and m = min per group (both rounded to float16 first), q = round((w - m) / d)."""
    n, k = w.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, got {k}")
    g = w.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)  # [N, G, 32]
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(lo))
    q = ((g - m.float()[..., None]) * inv[..., None]).round().clamp_(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # [N, G, 16]
    return packed.reshape(n, k // 2).contiguous(), d.contiguous(), m.contiguous()


def int4_levels(qweight: Tensor, groups: int) -> Tensor:
    """qweight uint8 [N, K / 2] -> the unpacked q in 0..15, uint8 [N, G, 32] (Q4_1 order)."""
    b = qweight.reshape(qweight.shape[0], groups, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """-> float32 [N, K]."""
    n, groups = scales.shape
    q = int4_levels(qweight, groups).float()  # [N, G, 32]
    w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(n, groups * INT4_GROUP)


def quantize_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (qweight int8 [N, K], scales float16 [N, K / G]), symmetric, absmax / 127 per
    group (G = K, per channel, when ``group_size`` is None). The scale is rounded to float16
    before dividing, so q is the best int8 for the scale actually stored."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    if k % gs:
        raise ValueError(f"int8 group size {gs} does not divide in_features {k}")
    g = w.detach().float().reshape(n, k // gs, gs)
    scale = (g.abs().amax(-1) / 127).half()  # [N, K / G]
    inv = torch.where(scale.float() > 0, 1.0 / scale.float(), torch.zeros_like(scale.float()))
    q = (g * inv[..., None]).round().clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale.contiguous()


def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    """-> float32 [N, K]."""
    n, k = qweight.shape
    groups = scales.shape[1]
    w = qweight.float().reshape(n, groups, k // groups) * scales.float()[..., None]
    return w.reshape(n, k)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """x [M, K] @ dequantize_int4(...)^T -> [M, N] in x's dtype (float32 math)."""
    w = dequantize_int4(qweight, scales, mins).to(x.device)
    return (x.float() @ w.t()).to(x.dtype)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ dequantize_int8(...)^T -> [M, N] in x's dtype (float32 math)."""
    w = dequantize_int8(qweight, scales).to(x.device)
    return (x.float() @ w.t()).to(x.dtype)


# ---- int8 activations (model.quantize_activations): llama.cpp's Q8 dot products ----
#
# Each row of x is quantized in blocks of 32 (the int4 group) before the product: dx = amax / 127,
# xq = round-half-even(x * (1 / dx)) in -127..127 (quantize_activations_int8 says what becomes of
# zero, tiny and non-finite blocks). Block u's integer dot with the weights' integers is exact; it
# is then scaled by d * dx (int4: plus m * dx * sum(xq)).


def quantize_activations_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] (K % 32 == 0) -> (xq int8 [M, K], dx float32 [M, K / 32]). A block whose 1 / dx
    is not finite (amax 0 or below ~4e-37) is all zeros; one holding a NaN / inf gets dx NaN."""
    m, k = x.shape
    g = x.float().reshape(m, k // INT4_GROUP, INT4_GROUP)
    finite = torch.isfinite(g).all(-1)  # [M, G]
    d = g.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    usable = finite & torch.isfinite(inv)
    inv = torch.where(usable, inv, torch.zeros_like(inv))
    d = torch.where(usable, d, torch.zeros_like(d))
    d = torch.where(finite, d, torch.full_like(d, math.nan))
    q = (torch.where(usable[..., None], g, torch.zeros_like(g)) * inv[..., None]).round()
    return q.to(torch.int8).reshape(m, k), d


def _block_dots(xq: Tensor, wq: Tensor) -> Tensor:
    """xq [M, K], wq [N, K] integers -> exact per-block dot products [M, N, K / 32] (float64)."""
    m, k = xq.shape
    n = wq.shape[0]
    xb = xq.double().reshape(m, k // INT4_GROUP, INT4_GROUP)
    wb = wq.double().reshape(n, k // INT4_GROUP, INT4_GROUP)
    return torch.einsum("mgj,ngj->mng", xb, wb)


def int4_linear_a8(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """x [M, K] @ W^T with x quantized by ``quantize_activations_int8`` (float64 math)."""
    xq, dx = quantize_activations_int8(x)
    n, groups = scales.shape
    wq = int4_levels(qweight, groups).reshape(n, groups * INT4_GROUP)  # [N, K], 0..15
    dots = _block_dots(xq, wq.to(xq.device))  # [M, N, G]
    sums = xq.double().reshape(xq.shape[0], 1, groups, INT4_GROUP).sum(-1)  # [M, 1, G]
    dx = dx.double()[:, None, :]
    y = scales.double() * dx * dots + mins.double() * dx * sums
    return y.sum(-1).to(x.dtype)


def int8_linear_a8(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ dequantize_int8(...)^T with x quantized by ``quantize_activations_int8``
    (float64 math; the group size a multiple of 32)."""
    xq, dx = quantize_activations_int8(x)
    k = qweight.shape[1]
    d = scales.repeat_interleave(k // scales.shape[1] // INT4_GROUP, dim=1)  # [N, K / 32]
    dots = _block_dots(xq, qweight.to(xq.device))  # [M, N, K / 32]
    return (d.double() * dx.double()[:, None, :] * dots).sum(-1).to(x.dtype)
