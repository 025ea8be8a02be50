"""Plain-torch references for the fused elementwise kernels (RMSNorm, residual add, RoPE, SiLU).

Semantics follow ``engine/model.py`` (HF Llama): RMS statistics in float32, the normalised value
cast back to the input dtype BEFORE the weight multiply; RoPE in rotate-half (NeoX) form with a
full-width cos/sin table. On CPU these are the production path, like ``kernels/reference.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [N, H], weight [H] -> weight * (x / rms(x)).to(x.dtype), statistics in float32."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h = x + residual (in x's dtype); returns (rms_norm(h), h): the pre-norm residual stream
    of a decoder layer in one pass over memory instead of three."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [N, 2 * I] (gate first, up second) -> silu(gate) * up [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary(
    q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """Rotate q [N, Hq, D] and k [N, Hkv, D] by their positions int64 [N]; cos/sin [P, D] float32
    tables with the two halves equal (engine.model.RotaryEmbedding). Returns new tensors."""
    c = cos.index_select(0, positions).to(q.dtype)[:, None, :]  # [N, 1, D]
    s = sin.index_select(0, positions).to(q.dtype)[:, None, :]

    def rotate_half(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
