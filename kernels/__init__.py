"""Kernel dispatch: the Triton kernel for CUDA tensors, the torch reference for CPU tensors
(except decode attention, the KV store and the fused elementwise kernels: on CPU these are C++
kernels, ``kernels/cpu_ext.py``, tested against the references and falling back to them).

The engine calls only the names below. The table maps (kernel, device type) to an implementation
given as ``"module:function"``; Triton modules are imported on the first CUDA call, so
``import kernels`` never imports triton (cheap on CPU, and TRITON_INTERPRET need not be set).

Shapes and semantics are documented on the references: ``kernels/reference.py`` (attention,
KV store, FP8), ``kernels/fused_reference.py`` (RMSNorm, SiLU-mul, RoPE) and
``kernels/quant_reference.py`` (weight-only int4 / int8 linear layers). Each Triton twin
(``kernels/triton_*.py``) takes the same arguments plus keyword-only extras (``out=``, tile or
split overrides) and asserts shapes, strides and dtypes before launching.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from kernels import reference
from kernels.reference import dequantize_fp8, quantize_fp8

__all__ = [
    "quantize_fp8",
    "dequantize_fp8",
    "store_kv",
    "prefill_attention",
    "decode_attention",
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rotary",
    "int4_linear",
    "int8_linear",
    "argmax_rows",
    "KERNELS",
]

# kernel name -> device type -> "module:function"
KERNELS: dict[str, dict[str, str]] = {
    "store_kv": {
        "cpu": "kernels.cpu_ext:store_kv",
        "cuda": "kernels.triton_store_kv:store_kv",
    },
    "prefill_attention": {
        "cpu": "kernels.reference:prefill_attention",
        "cuda": "kernels.triton_prefill:prefill_attention",
    },
    "decode_attention": {
        "cpu": "kernels.cpu_ext:decode_attention",
        "cuda": "kernels.triton_decode:decode_attention",
    },
    **{
        name: {"cpu": f"kernels.cpu_ext:{name}", "cuda": f"kernels.triton_fused:{name}"}
        for name in ("rms_norm", "add_rms_norm", "silu_mul", "rotary")
    },
    **{
        name: {"cpu": f"kernels.cpu_ext:{name}", "cuda": f"kernels.triton_quant_linear:{name}"}
        for name in ("int4_linear", "int8_linear")
    },
}


def bind(name: str, device_type: str, dtype: torch.dtype) -> Callable[..., object]:
    """``name`` for inputs that always come in the engine model's layouts, on ``device_type`` with
    ``dtype`` activations: on CPU the C++ op itself (``cpu_ext.direct``: no per-call checks),
    else the dispatch function below (same arguments)."""
    if device_type == "cpu":
        from kernels import cpu_ext

        op = cpu_ext.direct(name, dtype)
        if op is not None:
            return op
    return globals()[name]


@cache
def resolve(name: str, device_type: str) -> Callable[..., object]:
    """The implementation of kernel ``name`` for tensors on ``device_type`` (imported lazily)."""
    try:
        target = KERNELS[name][device_type]
    except KeyError:
        raise NotImplementedError(f"no {name} kernel for device type {device_type!r}") from None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def store_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """key, value [N, Hkv, D] -> paged cache at slot_mapping int64 [N] (negative = skip).
    FP8 cache: quantized per token and KV head, scales written to k_scale / v_scale."""
    impl = resolve("store_kv", key.device.type)
    impl(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    sm_scale: float,
    *,
    k_cache: Tensor | None = None,
    v_cache: Tensor | None = None,
    block_tables: Tensor | None = None,
    context_lens: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Causal varlen attention, q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]; with
    ``context_lens`` the queries also attend to a cached prefix read through ``block_tables``."""
    impl = resolve("prefill_attention", q.device.type)
    return impl(
        q, k, v, cu_seqlens, max_seqlen, sm_scale,
        k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        context_lens=context_lens, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    cu_seqlens_q: Tensor,
    max_query_len: int,
    sm_scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Paged attention, q [N, Hq, D] (n_b queries per sequence, already cached) -> [N, Hq, D]."""
    impl = resolve("decode_attention", q.device.type)
    return impl(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len, sm_scale,
        k_scale, v_scale,
    )  # fmt: skip


def argmax_rows(x: Tensor) -> Tensor:
    """Greedy picks of logits x [B, V] float32 -> int64 [B] (``reference.argmax_rows``): on CPU
    the C++ op (torch's runs on one thread), elsewhere torch's own (no table entry: CUDA's argmax
    is already parallel, so it has no Triton twin)."""
    if x.device.type == "cpu":
        from kernels import cpu_ext

        return cpu_ext.argmax_rows(x)
    return reference.argmax_rows(x)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [N, H] -> weight * (x / rms(x)).to(x.dtype), float32 statistics (HF Llama)."""
    return resolve("rms_norm", x.device.type)(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h = x + residual; returns (rms_norm(h, weight, eps), h) in one pass."""
    return resolve("add_rms_norm", x.device.type)(x, residual, weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [N, 2 * I] (gate first) -> silu(gate) * up [N, I]."""
    return resolve("silu_mul", gate_up.device.type)(gate_up)


def rotary(
    q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """RoPE (rotate-half form) on q [N, Hq, D], k [N, Hkv, D] at positions int64 [N] with
    float32 cos/sin tables [P, D] (engine.model.RotaryEmbedding's). Returns new tensors."""
    return resolve("rotary", q.device.type)(q, k, positions, cos, sin)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """x [M, K] (float32 / bfloat16 / float16) @ W^T -> [M, N] in x's dtype, W int4 in groups of
    32 (llama.cpp Q4_1: qweight uint8 [N, K/2], scales / mins float16 [N, K/32])."""
    return resolve("int4_linear", x.device.type)(x, qweight, scales, mins)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, W int8 [N, K] with float16 scales [N, K/G]."""
    return resolve("int8_linear", x.device.type)(x, qweight, scales)
