"""Everything one engine (one device's worth of model + cache + scheduler) needs to start."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from core.config import check_quantize_activations
from engine.kv_cache import KV_DTYPES
from engine.quantized_weight import QUANTIZATIONS

MODEL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", *MODEL_DTYPES)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or usable AMX tiles), as
    torch's cpuinfo and oneDNN see it. Without either, oneDNN emulates bf16 matmuls with float32
    ones plus conversions (slower than float32), so ``auto`` stays on float32."""
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True
    return cpu_has_amx()


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that this process may use (oneDNN's bf16 matmuls then run
    on them). AMX is listed on some VMs whose kernel does not grant the tile state: ask for it."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
                and torch._C._cpu._init_amx())  # fmt: skip


def auto_dtype(device: torch.device) -> torch.dtype:
    """``dtype: auto``: bfloat16 on CUDA (float16 before Ampere) and on a CPU with native bf16
    matmuls; float32 on other CPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


SPEC_METHODS = ("none", "ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "none"  # none | ngram | draft
    num_speculative_tokens: int = 0
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model: str | None = None  # a model source sharing the target's tokenizer
    # Off-switch: once a request has had ``warmup_tokens`` proposals, it stops speculating if
    # fewer than ``min_acceptance_rate`` of them were accepted (verifying rejected guesses
    # costs compute and, for a draft model, a draft forward per token).
    min_acceptance_rate: float = 0.2
    warmup_tokens: int = 16

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative.method must be one of {SPEC_METHODS}: {self.method!r}")
        if self.method != "none" and self.num_speculative_tokens < 1:
            raise ValueError("speculative.num_speculative_tokens must be >= 1 to speculate")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("speculative: need 1 <= ngram_min <= ngram_max")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("speculative.draft_model is required with, and only with, 'draft'")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class EngineConfig:
    model: str = "builtin:smollm2-135m-instruct"
    dtype: str = "float32"  # or auto (see auto_dtype), bfloat16, float16
    quantization: str = "none"  # none | int8 | int4: weight-only (engine/quantized_weight.py)
    keep_dense_weights: bool = False  # quantized: also a dense copy for large steps (linear.py)
    quantize_activations: bool = False  # int8 activations for small quantized CPU steps (linear.py)
    max_model_len: int = 2048
    device: str = "auto"  # "auto": cuda if available, else cpu
    block_size: int = 16
    num_blocks: int | None = None  # None: derive from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    kv_cache_dtype: str = "auto"  # "auto" = model dtype, or "fp8_e4m3"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunk_size: int = 512
    enable_prefix_caching: bool = True
    record_kv_events: bool = False  # keep block-hash events for a router (workers publish them)
    # decode and colocated workers: a decode step between two chunks of a prompt they prefill
    # themselves, so a local prefill does not stall the running batch for its whole length
    interleave_prefill: bool = False
    num_threads: int | None = None  # CPU intra-op threads; None: torch's default
    speculative: SpeculativeConfig = SpeculativeConfig()

    def __post_init__(self) -> None:
        if isinstance(self.speculative, dict):  # from a msgpack / Ray worker spec
            object.__setattr__(self, "speculative", SpeculativeConfig(**self.speculative))
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        check_quantize_activations(self.quantize_activations, self.quantization)
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ValueError(
                f"kv_cache_dtype must be 'auto' or 'fp8_e4m3', got {self.kv_cache_dtype!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "chunk_size", "kv_cache_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return auto_dtype(self.torch_device())
        return MODEL_DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.kv_cache_dtype == "auto" else KV_DTYPES["fp8_e4m3"]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
