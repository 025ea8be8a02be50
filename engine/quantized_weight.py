"""A weight-only quantized [N, K] matrix in one of the row-wise formats of
``kernels/quant_reference.py`` (int4 = llama.cpp Q4_1 blocks, int8 = symmetric with group G).

Loaders return these for tensors they keep in their file's quantized form (a GGUF's Q4_1 / Q8_0
blocks); ``engine.linear.Linear`` quantizes the rest at load time. Row-wise means row slices and
row concatenations (fused q/k/v, gate/up, llama.cpp's Q/K row permutation) need no requantizing.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import quant_reference as qr

QUANTIZATIONS = ("none", "int8", "int4")
FORMATS = ("int4", "int8")


@dataclass(frozen=True)
class QuantizedWeight:
    fmt: str  # "int4" | "int8"
    qweight: Tensor  # int4: uint8 [N, K / 2]; int8: int8 [N, K]
    scales: Tensor  # float16 [N, K / G]
    mins: Tensor | None = None  # int4 only: float16 [N, K / 32]

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"quantized weight format must be one of {FORMATS}, got {self.fmt!r}")
        if (self.mins is None) != (self.fmt == "int8"):
            raise ValueError("int4 weights need mins; int8 weights have none")

    @property
    def shape(self) -> tuple[int, int]:
        n, width = self.qweight.shape
        return (n, width * 2 if self.fmt == "int4" else width)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        parts = (self.qweight, self.scales) + (() if self.mins is None else (self.mins,))
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> tuple[Tensor, ...]:
        """The kernel's arguments after x: (qweight, scales[, mins])."""
        return (self.qweight, self.scales) if self.mins is None else (
            self.qweight, self.scales, self.mins)  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[N, K] in ``dtype`` (the exact float32 weights, rounded once if 16-bit)."""
        if self.device.type == "cpu":
            from kernels import cpu_ext  # the C++ kernel: a large M dequantizes every step

            if self.fmt == "int4":
                return cpu_ext.int4_dequantize(self.qweight, self.scales, self.mins, dtype)
            return cpu_ext.int8_dequantize(self.qweight, self.scales, dtype)
        return self.reference_values().to(dtype)

    def reference_values(self) -> Tensor:
        """[N, K] float32 by the torch references, on any device and without the C++ extension
        (which ``dequantize`` loads, and builds if need be, on CPU): the same values."""
        if self.fmt == "int4":
            return qr.dequantize_int4(self.qweight, self.scales, self.mins)
        return qr.dequantize_int8(self.qweight, self.scales)

    def rows(self, index: Tensor) -> QuantizedWeight:
        """Rows ``index`` (a permutation or selection), still quantized."""
        pick = lambda t: None if t is None else t.index_select(0, index).contiguous()  # noqa: E731
        return QuantizedWeight(self.fmt, pick(self.qweight), pick(self.scales), pick(self.mins))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.fmt, move(self.qweight), move(self.scales), move(self.mins))

    @staticmethod
    def cat(parts: Seq[QuantizedWeight]) -> QuantizedWeight:
        """Rows of ``parts`` one after another (same format and group size)."""
        first = parts[0]
        if any(p.fmt != first.fmt or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot concatenate quantized weights of different formats / groups")
        cat = lambda ts: None if ts[0] is None else torch.cat(ts).contiguous()  # noqa: E731
        return QuantizedWeight(
            first.fmt,
            cat([p.qweight for p in parts]),
            cat([p.scales for p in parts]),
            cat([p.mins for p in parts]),
        )

    @staticmethod
    def quantize(w: Tensor, fmt: str, group_size: int | None = None) -> QuantizedWeight:
        """Quantize a dense [N, K] weight: int4 in groups of 32, int8 per channel (or per
        ``group_size``)."""
        if fmt == "int4":
            return QuantizedWeight("int4", *qr.quantize_int4(w))
        if fmt == "int8":
            return QuantizedWeight("int8", *qr.quantize_int8(w, group_size))
        raise ValueError(f"quantized weight format must be one of {FORMATS}, got {fmt!r}")
