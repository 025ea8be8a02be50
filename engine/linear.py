"""Bias-free linear layer whose weight is dense or weight-only quantized, chosen at load time.

Storage and kernel, by device and format (``Linear.load`` picks; ``forward`` follows):

- dense float32 on CPU, up to ``F32_DIRECT_MAX_ROWS`` rows (a decode step: M = batch size; a
  verification step): our FMA kernel on the plain weight (csrc/dense_linear_f32.cpp, AVX-512 or
  AVX2), each row's outputs the same in any call of up to that many rows. MKL ran such calls on
  one thread; even split as below, SmolLM2's 30 layers took 20.8 / 27.3 / 28.0 ms at 1 / 2 / 4
  rows against 15.3 / 18.4 / 18.4 ms for ours (AMD EPYC, 2 threads; docs/benchmarks.md "float32
  decode steps"). Not MKL's summation order: outputs differ from ``F.linear``'s in the last bits.
- dense float32 on CPU, more rows (or no such kernel: K not a multiple of its lanes, no AVX2):
  MKL, with few rows on ONE thread at ~15 GB/s. Viewing the weight as P
  row blocks ``[P, N/P, K]`` (no copy) and calling one ``bmm`` hands MKL P independent problems,
  which it spreads over the threads; three blocks per thread (smaller blocks stay in L2) beat one
  per thread by another ~10 % from M=32 up. The outputs are bit-identical to ``F.linear`` (each
  output element is the same dot product, accumulated in the same order; ``python -m
  bench.linear`` checks it). Prefill-sized inputs (above ``SPLIT_MAX_ROWS`` rows, where MKL's
  GEMM already uses every thread and the split's output transpose costs a few %: M=2048 88 vs 92
  ms), one thread and N not divisible by the thread count take plain ``F.linear``.
- dense on CPU, ``pack=True`` (the LM head in float32; every layer in bfloat16 / float16): oneDNN
  on a weight reordered once into its blocked layout. For the LM head (N = vocab >> K) that beats
  MKL and the split at every decode size (SmolLM2's [49152, 576] head, 2 threads, split ->
  packed: M=1 3.8 -> 3.8 ms, M=8 12.7 -> 5.9, M=64 32.7 -> 25.1); for 16-bit weights it is
  the only fast kernel torch has on CPU (AVX512-BF16 / AMX when the CPU has them). A bfloat16
  call of up to 128 rows runs on the same packed bytes in our C++ op instead
  (csrc/dense_linear.cpp), without oneDNN's ~17 us per call. On a CPU with AMX: the same tile
  arithmetic as oneDNN's up to 32 rows, equal outputs (SmolLM2's 30 layers at 1-16 rows 6.3-7.8
  vs 9.9-11.9 ms, at 17-32 rows 9.9-10.4 vs 13.3-14.2); above 32 rows 32 at a time, so that each
  row's outputs do not depend on the rows beside it, as oneDNN's do above 32. On one with
  AVX512-BF16 only: vdpbf16ps, each row alike (an AMD EPYC: 5.7 vs 11.6 ms at 1 row, 13.4 vs
  15.9 at 16, 39.6 vs 41.2 at 64; docs/benchmarks.md "bfloat16 decode steps without AMX").
- int8 / int4 (``engine.quantized_weight``): ``kernels.int8_linear`` / ``kernels.int4_linear``,
  the C++ CPU kernels or the Triton ones on CUDA; activations stay in the model dtype. They read
  4-8x fewer bytes than float32 but do the multiply-adds on dequantized floats, so they win only
  while the weight read dominates. Steps of more rows take the dense path: the dense copy when
  ``load(keep_dense=True)`` kept one (above ``QUANT_MAX_ROWS``: decode batches of 9+, prefill;
  ``QUANT_MAX_ROWS_BESIDE_DIRECT_BF16``, 5, for a bfloat16 copy our dense kernel takes), else the
  weight dequantized for the call (above ``QUANT_MAX_ROWS_NO_DENSE``: prefill chunks).
- int4 / int8 with float activations on an AVX-512 CPU: ``linear_packed``
  (``kernels/csrc/quant_linear_packed.cpp``) on the weight repacked as for ``linear_a8``, 16
  output rows in the lanes of a vector, within the same row limits but bfloat16 x of int4 (on
  AVX512-BF16 only: up to ``QUANT_MAX_ROWS_PACKED_BF16``) and float32 x (up to
  ``QUANT_MAX_ROWS_PACKED_F32``). SmolLM2's 30 layers (an AMD EPYC, 2
  threads, ``python -m bench.linear``): bfloat16 x of int4 2.65 vs 4.34 ms at 1 row, 13.8 vs 46.4
  at 16; float32 x of int4 2.61 vs 3.64 at 1 row, 9.81 vs 15.11 at 8; int8 per channel 3.55 vs
  4.24 at 1 row, 10.28 vs 15.75 at 8 (docs/benchmarks.md "On the EPYC, 2026-12-05").
- int4 / int8 with ``int8_activations`` (``model.quantize_activations``, CPU): ``linear_a8``
  (``kernels/csrc/quant_linear_a8.cpp``) in place of the float kernel, up to ``A8_MAX_ROWS`` (64)
  rows (``A8_MAX_ROWS_BESIDE_AMX_BF16``, 32, beside a bfloat16 dense copy on a CPU with AMX):
  each row of x rounded to int8 in blocks of 32, integer dot products on a copy of the weight
  repacked at load (where that kernel cannot run, its torch reference, within the float kernel's
  row limits). Which kernel a row takes depends on the step's row count, so its result does too.
  For SmolLM2's int4 layers 2.0x faster than the float kernel at 1 row, 3.6x at 8 (2 threads),
  and on an AVX-512 CPU without AMX faster than bfloat16 oneDNN up to 128 rows (~0.7x its time
  at 64); not exact.
- dense on CUDA: ``F.linear`` (cuBLAS).

Figures: docs/benchmarks.md "Weight-only quantization" (``python -m bench.linear``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.engine_config import cpu_has_amx
from engine.quantized_weight import QuantizedWeight

SPLIT_MAX_ROWS = 512
BLOCKS_PER_THREAD = 3
# Rows up to which a float32 call on CPU takes our kernel (csrc/dense_linear_f32.cpp), not MKL:
# ``python -m bench.linear --rows 1,2,4,8,16,32 --formats f32-split,f32-direct`` (AMD EPYC, 2
# threads, SmolLM2's 30 layers): 22.1 vs 33.6 ms at 8 rows, 33.7 vs 41.2 at 16, 56.7 vs 57.7 at 32.
F32_DIRECT_MAX_ROWS = 16
# Rows up to which a step uses the quantized kernel (CPU, 2 threads, SmolLM2's 30 layers,
# ``python -m bench.linear``): against a kept dense copy (bfloat16 oneDNN / float32 MKL) the
# crossover is between 8 and 16 rows; against dequantizing the whole weight for the call, near 16
# rows for bfloat16 (int4 43.8 vs 60.7 ms at 16, 167.6 vs 75.3 at 64) and between 32 and 64 for
# float32 (int4 vs int4-deq-f32: 43.8 vs 91.6 ms at 16, 167.6 vs 154.4 at 64).
QUANT_MAX_ROWS = 8
# ... but 5 against a bfloat16 dense copy that our dense kernel takes (csrc/dense_linear.cpp,
# ``dense_runs_direct``). On a CPU with AMX, where oneDNN's bfloat16 runs on the tiles
# (``python -m bench.linear --threads 2 --rows 1,2,4,5,8 --formats int4-bf16,bf16-onednn``, 30
# layers, Intel Xeon with AMX, two runs: oneDNN ~10 ms flat from 1 to 8 rows; int4 with bfloat16 x
# 3.2 / 3.5 at 1 row, 8.3 / 9.1 at 4, 11.5 / 11.8 at 5, 15.6 / 16.1 at 8). 4 would be the crossover;
# 5 keeps a batch-1 verification step of k = 4 tokens on the int4 kernel, so it computes each row as
# the decode steps it replaces do (csrc/quant_linear_bf16.cpp). Since the dense copy's calls of up
# to 128 rows run on our tiles (csrc/dense_linear.cpp: 6.3-6.7 ms from 1 to 16 rows, best of 15;
# int4 3.35 at 1 row, 5.49 at 2, 8.75 at 3, 11.63 at 5) the crossover is at 2-3 rows; 5 is kept for
# that same reason. On an AMD EPYC (AVX512-BF16, no AMX) our vdpbf16ps kernel on the dense copy
# against int4 with bfloat16 x (``--rows 1,2,4,8 --formats bf16-packed,int4-bf16``, 2026-12-04):
# 5.69 vs 5.01 ms at 1 row, 5.45 vs 5.79 at 2, 5.68 vs 8.46 at 4, 8.33 vs 14.98 at 8: 5 for the same
# reason.
QUANT_MAX_ROWS_BESIDE_DIRECT_BF16 = 5
# ... but int4 with bfloat16 x on the repacked weight (csrc/quant_linear_packed.cpp) keeps up
# with our vdpbf16ps kernel on the dense copy further (AMD EPYC, ``--rows 1,2,4,5,8,16 --formats
# int4-bf16-packed,bf16-packed``, 2026-12-04: 2.65 vs 5.84 ms at 1 row, 5.69 vs 7.19 at 5, 7.72
# vs 8.51 at 8, 13.78 vs 13.28 at 16): 8 rows where the dense copy is not on AMX tiles (not
# measured against those).
QUANT_MAX_ROWS_PACKED_BF16 = 8
# ... and float32 x on the repacked weight (its FMA way) against our float32 kernel on the dense
# copy (AMD EPYC, ``--rows 8,12,16,24,32 --formats f32-direct,int4-packed,int8-packed``,
# 2026-12-05, 30 layers): int4 10.0 / 19.3 / 37.6 vs 21.3 / 32.0 / 55.3 ms at 8 / 16 / 32 rows,
# int8 10.4 / 20.1 / 37.9; the LM head (int8) 9.3 vs 14.5 at 32: 32 rows (from 17 the dense copy
# is MKL's, slower still).
QUANT_MAX_ROWS_PACKED_F32 = 32
# The same with int8 activations (``linear_a8``), against bfloat16 oneDNN (``python -m bench.linear
# --threads 2 --rows 1,8,16,32,64,128 --formats bf16-onednn,int4-a8,int8-g32-a8``, 30 layers, two
# runs): 37.4 / 41.0 vs 54.0 / 54.2 ms at 64 rows, 75.8 / 70.5 vs 89.2 / 81.4 at 128; the LM head
# (int8 group 32) 9.3 / 7.5 vs 10.5 / 13.8 ms at 64. 64 rows: a full decode batch of the configs'
# max_num_seqs; prefill chunks above it keep the dense copy (and its bfloat16 activations). On an
# AMD EPYC without AMX, against our vdpbf16ps kernel on the dense copy (``--formats
# bf16-packed,int4-a8``, 2026-12-04): 10.8 vs 13.4 ms at 16 rows, 33.5 vs 39.6 at 64.
A8_MAX_ROWS = 64
# ... except against a bfloat16 dense copy on a CPU with AMX, where oneDNN's bfloat16 runs on the
# tiles: there linear_a8 (on AMX too from 32 rows, csrc/quant_linear_a8.cpp) is faster up to ~32
# rows only (same command, Intel Xeon with AMX, 30 layers: 11.9 vs 12.8 ms at 32 rows, 17.1 vs
# 13.3 at 48, 21.5 vs 14.6 at 64; the LM head ties at 16-32). Without a dense copy A8_MAX_ROWS
# holds: dequantizing the weight for the call costs more.
A8_MAX_ROWS_BESIDE_AMX_BF16 = 32
QUANT_MAX_ROWS_NO_DENSE = {torch.float32: 48, torch.bfloat16: 16, torch.float16: 16}
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies a ``dtype`` weight on this CPU. Its float16 path needs
    AVX512-FP16 or AVX-NE-CONVERT (an AMD Zen 4 has neither: the reorder raises); such a weight
    stays plain and takes ``F.linear``."""
    if not _ONEDNN:
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(32, 32, dtype=dtype), None)
        onednn_linear(torch.ones(1, 32, dtype=dtype), packed)
    except RuntimeError:
        return False
    return True


@functools.cache
def dense_runs_direct(n: int, k: int) -> bool:
    """Whether bfloat16 calls of up to 128 rows on an [n, k] oneDNN-packed weight take our kernel
    (csrc/dense_linear.cpp: AMX tiles or vdpbf16ps, each row batch-invariant), not oneDNN's."""
    from kernels import cpu_ext

    ops = cpu_ext.load_ops() if onednn_packs(torch.bfloat16) else None
    return ops is not None and ops.dense_linear_kernel(n, k) != "onednn"


@functools.cache
def f32_direct_lanes() -> int:
    """The float32 lanes of our dense kernel here (16: AVX-512, 8: AVX2), 0 if it is not built."""
    from kernels import cpu_ext

    ops = cpu_ext.load_ops()
    lanes = [] if ops is None else ops.dense_linear_f32_lanes()
    return lanes[0] if lanes else 0


def runs_f32_direct(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether our float32 kernel takes ``dtype`` x [..., K] @ weight [N, K]^T (rows not
    counted: up to ``F32_DIRECT_MAX_ROWS``)."""
    lanes = f32_direct_lanes() if weight.device.type == "cpu" else 0
    return (lanes > 0 and dtype == weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % lanes == 0)  # fmt: skip


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # dense until ``load`` quantizes it (then None: the quantized copy is the only one)
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.quantized: QuantizedWeight | None = None
        self.packed: torch.Tensor | None = None  # oneDNN-blocked copy of weight, see load
        self._quant_kernel = None  # set with the quantized weight, see bind
        self.kernel_tensors: tuple[torch.Tensor, ...] = ()  # the weight as _quant_kernel takes it
        self.max_quant_rows = QUANT_MAX_ROWS  # steps up to this many rows take _quant_kernel
        self.a8 = False  # _quant_kernel is linear_a8 on kernel_tensors (repacked), see bind
        self._dense_kernel = onednn_linear  # x [M, K], packed -> y on CPU, see bind
        self.dtype = self.weight.dtype  # the model dtype (set again by load)

    def bind(self, device_type: str, dtype: torch.dtype, int8_activations: bool = False) -> None:
        """The quantized kernel for ``dtype`` activations and the weight tensors it takes, bound
        once (``kernels.bind``). ``int8_activations`` (on CPU, ``quantize_activations``):
        ``linear_a8`` on the weight repacked for it (the quantized tensors stay too: dequantizing
        and embedding lookups read them), or its torch reference (``int4_linear_a8`` /
        ``int8_linear_a8``) where that kernel does not run (no extension, N % 16 != 0, float16).
        Weights whose blocks of 32 inputs would straddle scale groups (K or an int8 group size
        not a multiple of 32) keep float activations. Without ``int8_activations``, a quantized
        weight on CPU takes ``linear_packed`` on that same repacked weight where the extension
        runs it for ``dtype`` (AVX-512; bfloat16 x of int4: AVX512-BF16; no activation rounded, as
        ``int4_linear`` / ``int8_linear``). A packed bfloat16 weight on CPU takes
        ``dense_linear`` (csrc/dense_linear.cpp: oneDNN, or up to 128 rows our AMX tiles or
        vdpbf16ps kernel on oneDNN's own bytes) where the extension is built."""
        self._dense_kernel = onednn_linear
        if self.packed is not None and device_type == "cpu":
            from kernels import cpu_ext

            self._dense_kernel = cpu_ext.direct("dense_linear", dtype) or onednn_linear
        q = self.quantized
        if q is None:
            return
        self._quant_kernel = kernels.bind(f"{q.fmt}_linear", device_type, dtype)
        self.kernel_tensors = q.tensors()
        self.max_quant_rows, self.a8 = QUANT_MAX_ROWS, False
        if self.has_dense and dtype == torch.bfloat16 and device_type == "cpu":
            if dense_runs_direct(self.out_features, self.in_features):
                self.max_quant_rows = QUANT_MAX_ROWS_BESIDE_DIRECT_BF16
        blocks = self.in_features % 32 == 0 and (q.fmt == "int4" or q.group_size % 32 == 0)
        if int8_activations and device_type == "cpu" and blocks:
            from kernels import cpu_ext, quant_reference

            op = cpu_ext.direct("linear_a8", dtype)
            packed = None if op is None else cpu_ext.pack_a8(q.fmt, q.tensors())
            if packed is None:  # no extension, float16 activations, or N % 16 != 0: the
                # reference (float64, [M, N, K / 32] block sums), at the float kernels' limit
                self._quant_kernel = getattr(quant_reference, f"{q.fmt}_linear_a8")
            else:
                self._quant_kernel, self.kernel_tensors, self.a8 = op, tuple(packed), True
                self.max_quant_rows = A8_MAX_ROWS
                if self.has_dense and dtype == torch.bfloat16 and cpu_has_amx():
                    self.max_quant_rows = A8_MAX_ROWS_BESIDE_AMX_BF16  # (a dense copy's there)
        elif device_type == "cpu" and blocks:
            from kernels import cpu_ext

            op = cpu_ext.direct("linear_packed", dtype)
            bits = 4 if q.fmt == "int4" else 8
            built = op is not None and cpu_ext.load_ops().linear_packed_available(dtype, bits)
            packed = cpu_ext.pack_float(q.fmt, q.tensors()) if built else None
            if packed is not None:
                # the int8 view marks the kernel for DecoderStack (csrc/decoder_layer.cpp)
                self._quant_kernel = op
                self.kernel_tensors = (packed[0].view(torch.int8), packed[1])
                if q.fmt == "int4" and dtype == torch.bfloat16 and not cpu_has_amx():
                    self.max_quant_rows = QUANT_MAX_ROWS_PACKED_BF16
                elif dtype == torch.float32:
                    self.max_quant_rows = QUANT_MAX_ROWS_PACKED_F32

    def rebase_kernel_tensors(self, copies: dict[int, torch.Tensor]) -> None:
        """Point the quantized kernel's weight tensors at ``copies[id(tensor)]`` (equal copies,
        ``engine.huge_pages``), and the quantized weight's own where they are the same tensors
        (so no second copy stays alive)."""
        self.kernel_tensors = tuple(copies.get(id(t), t) for t in self.kernel_tensors)
        q = self.quantized
        if q is not None and any(id(t) in copies for t in q.tensors()):
            pick = lambda t: None if t is None else copies.get(id(t), t)  # noqa: E731
            self.quantized = dataclasses.replace(
                q, qweight=pick(q.qweight), scales=pick(q.scales), mins=pick(q.mins)
            )

    @torch.no_grad()
    def load(
        self,
        w: torch.Tensor | QuantizedWeight,
        quantization: str = "none",
        pack: bool = False,
        keep_dense: bool = False,
        lookups: bool = False,
    ) -> None:
        """Set the weight. A dense ``w`` is quantized when ``quantization`` is int8 / int4 (int4
        in groups of 32, int8 per channel); a ``QuantizedWeight`` (a loader kept the file's
        blocks) is used as it is. ``keep_dense``: with a quantized weight, also keep it dense in
        the model dtype for steps above ``max_quant_rows`` rows. ``pack``: keep a dense CPU
        weight in oneDNN's layout (16-bit dense weights on CPU always are, where ``onednn_packs``
        their dtype), which every CPU call then takes: the plain copy is dropped (~212 MB of
        SmolLM2's bfloat16 layers), unless ``lookups`` (an embedding table reads rows of it)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(w.shape)} != {(self.out_features, self.in_features)}"
            )
        if self.weight is None or self.packed is not None or self.quantized is not None:
            raise ValueError("load() sets a layer's weight once")
        dtype, device = self.weight.dtype, self.weight.device
        self.dtype = dtype
        if isinstance(w, torch.Tensor) and quantization != "none":
            w = QuantizedWeight.quantize(w, quantization)
        self.quantized = None
        if isinstance(w, QuantizedWeight):
            self.quantized = w.to(device)
            self.bind(device.type, dtype)
            if not keep_dense:
                self.weight = None  # the quantized copy is the only one
                return
            w = self.quantized.dequantize(dtype) if device.type == "cpu" else (
                self.quantized.dequantize().to(dtype))  # fmt: skip
        self.weight.copy_(w)
        sixteen_bit = dtype in (torch.bfloat16, torch.float16)
        if (pack or sixteen_bit) and device.type == "cpu" and onednn_packs(dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            if not lookups:
                self.weight = None  # forward takes packed on CPU

    @property
    def has_dense(self) -> bool:
        """A dense copy (plain or packed) for the steps the quantized kernel does not take."""
        return self.weight is not None or self.packed is not None

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight data a decode step (at most max_quant_rows rows) reads."""
        if self.quantized is not None:
            return sum(t.numel() * t.element_size() for t in self.kernel_tensors)
        return self.in_features * self.out_features * self.dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # [M, K]
        q = self.quantized
        rows = x2.shape[0]
        if q is not None and (rows <= self.max_quant_rows or not self.has_dense):
            limit = self.max_quant_rows
            if not self.has_dense:
                limit = max(limit, QUANT_MAX_ROWS_NO_DENSE[x.dtype])
            if rows <= limit:
                y = self._quant_kernel(x2, *self.kernel_tensors)
            else:  # a large step without a dense copy: dequantize once for all its rows
                y = linear(x2, q.dequantize(x.dtype))
        elif self.packed is not None and x.device.type == "cpu":
            y = self._dense_kernel(x2, self.packed)
        else:
            y = linear(x2, self.weight)
        return y.view(*lead, self.out_features)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T with W packed by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N]."""
    n, k = weight.shape
    m = x.numel() // k
    if m <= F32_DIRECT_MAX_ROWS and x.device.type == "cpu" and runs_f32_direct(weight, x.dtype):
        x2 = x.reshape(m, k)  # [M, K]
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        return torch.ops.tandem_cpu.dense_linear_f32(x2, weight).view(*x.shape[:-1], n)
    return split_linear(x, weight)


def split_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N] by MKL, float32 in row blocks (module docstring)."""
    n, k = weight.shape
    m = x.numel() // k
    threads = torch.get_num_threads()
    if (x.is_cuda or threads == 1 or n % threads or m > SPLIT_MAX_ROWS
            or not weight.is_contiguous() or weight.dtype != torch.float32):  # fmt: skip
        return F.linear(x, weight)
    parts = threads * BLOCKS_PER_THREAD if n % (threads * BLOCKS_PER_THREAD) == 0 else threads
    lead = x.shape[:-1]
    x2 = x.reshape(m, k)  # [M, K]
    y = torch.bmm(x2.expand(parts, m, k), weight.view(parts, n // parts, k).transpose(1, 2))
    # y [P, M, N/P]: row block p of the output features; back to [M, N]
    y = y.view(n) if m == 1 else y.transpose(0, 1).reshape(m, n)
    return y.view(*lead, n)
