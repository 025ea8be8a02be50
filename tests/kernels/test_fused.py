"""Fused elementwise kernels: Triton (interpreter) vs reference vs the engine's torch modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paged_cases import rel_err

from kernels import fused_reference, triton_fused

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32: rsqrt / exp / summation order. 16-bit: both round to the activation dtype at the same
# points, so they differ by at most an ulp where a rounding lands on a tie-breaking boundary —
# and the interpreter's fp32 -> bf16 cast truncates (one more bf16 ulp, 2^-7 relative).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True])  # fp32 weight promotes the output
def test_rms_norm_and_add_rms_norm(dtype, weight_fp32):
    gen = torch.Generator().manual_seed(1)
    hidden = 576  # SmolLM2: not a power of two
    x = _randn(5, hidden, dtype=dtype, gen=gen) * 3
    residual = _randn(5, hidden, dtype=dtype, gen=gen)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(torch.float32 if weight_fp32 else dtype)
    out_dtype = torch.promote_types(dtype, weight.dtype)

    out = torch.full((5, hidden), float("nan"), dtype=out_dtype)
    triton_fused.rms_norm(x, weight, 1e-5, out=out)
    ref = fused_reference.rms_norm(x, weight, 1e-5)
    assert ref.dtype == out_dtype and rel_err(out, ref) < TOL[dtype]

    out.fill_(float("nan"))
    h_out = torch.full_like(x, float("nan"))
    triton_fused.add_rms_norm(x, residual, weight, 1e-5, out=out, h_out=h_out)
    ref_out, ref_h = fused_reference.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(h_out, ref_h) or dtype == torch.bfloat16  # bf16: interpreter truncation
    assert rel_err(h_out, ref_h) < TOL[dtype] and rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(2)
    gate_up = _randn(3, 2 * 1536, dtype=dtype, gen=gen) * 4  # 1536: SmolLM2 intermediate size
    out = torch.full((3, 1536), float("nan"), dtype=dtype)
    triton_fused.silu_mul(gate_up, out=out)
    ref = fused_reference.silu_mul(gate_up)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 1, 128)])
def test_rotary(dtype, q_heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(3)
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(64, dtype=torch.float32)[:, None] * inv_freq[None]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    cos, sin = emb.cos(), emb.sin()
    positions = torch.tensor([0, 5, 63, 17, 17], dtype=torch.int64)
    # q as a strided slice of a fused qkv projection, like the engine produces
    qkv = _randn(5, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : q_heads * head_dim].view(5, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(5, kv_heads, head_dim)
    q_out, k_out = triton_fused.rotary(q, k, positions, cos, sin)
    q_ref, k_ref = fused_reference.rotary(q, k, positions, cos, sin)
    assert rel_err(q_out, q_ref) < TOL[dtype] and rel_err(k_out, k_ref) < TOL[dtype]
    # the reference itself against the complex-number form of RoPE, in float64
    half = head_dim // 2
    z = torch.complex(q[..., :half].double(), q[..., half:].double())  # [N, H, D/2]
    angle = positions[:, None, None].double() * inv_freq.double()[None, None, :]
    rotated = z * torch.exp(1j * angle)
    truth = torch.cat((rotated.real, rotated.imag), dim=-1)
    assert rel_err(q_ref, truth) < {torch.float32: 1e-5}.get(dtype, TOL[dtype])


def test_references_match_engine_formulas():
    """The references compute exactly the HF Llama formulas (the C++ CPU kernels are tested against
    these references in test_cpu_ext.py)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 64, generator=gen).bfloat16()
    w = torch.rand(64, generator=gen)
    xf = x.float()
    engine_norm = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    assert torch.equal(fused_reference.rms_norm(x, w, 1e-6), engine_norm)
    gu = torch.randn(4, 64, generator=gen)
    assert torch.equal(fused_reference.silu_mul(gu), F.silu(gu[:, :32]) * gu[:, 32:])
