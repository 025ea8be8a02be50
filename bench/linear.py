"""CPU linear layers at decode sizes, per weight format: ms per model-worth of matmuls.

    python -m bench.linear                          # all torch threads, M = 1, 4, 16, 64
    python -m bench.linear --threads 2 --rows 1,8,64 --formats f32-split,int4

Weights are SmolLM2-135M's shapes: 30 distinct copies of each per-layer weight (qkv, o, gate_up,
down; so they stream from DRAM as in a real step, not from cache), and separately the [49152,
576] LM head. Formats (``--formats``):

    f32-mkl      float32 ``F.linear`` (MKL)
    f32-split    float32, MKL on row blocks (``engine.linear.split_linear``, = ``F.linear``)
    f32-direct   float32, our FMA kernel on the plain weight (kernels/csrc/dense_linear_f32.cpp)
    bf16-onednn  bfloat16 weights packed for oneDNN (``torch.ops.mkldnn._linear_pointwise``)
    bf16-packed  the same weights through the engine's op (kernels/csrc/dense_linear.cpp: our
                 AMX tiles on oneDNN's bytes up to 128 rows where the CPU has AMX, else oneDNN)
    int8-torch   ``torch._weight_int8pack_mm`` (int8 per channel; float32 activations)
    int4-torch   ``torch._weight_int4pack_mm_for_cpu`` (int4, group 32; bfloat16 activations,
                 bfloat16 scale / zero point); int4-torch-f32: the same with float32 ones
    int8         ours (kernels/csrc/quant_linear.cpp), int8 per channel, float32 activations;
                 int8-bf16: bfloat16 ones
    int8-g32     ours, int8 group 32 (llama.cpp Q8_0: the GGUF's LM head)
    int4         ours, int4 group 32 (llama.cpp Q4_1: the GGUF's layers), float32 activations
    int4-bf16    ours, int4 with bfloat16 activations
    int4-packed  int4, float32 activations, on the weight repacked as for int4-a8
                 (kernels/csrc/quant_linear_packed.cpp); int4-bf16-packed: bfloat16 ones;
                 int8-packed, int8-bf16-packed: the same for int8 per channel
    int4-deq-*   int4 dequantized for the call (C++) to float32 / bfloat16, then ``F.linear``:
                 what a large step costs without a dense copy (``keep_dense_weights: false``)
    int4-a8      ours with int8 activations (kernels/csrc/quant_linear_a8.cpp, the weight
                 repacked; ``quantize_activations``), bfloat16 activations in
    int8-g32-a8  the same for int8 group 32

It also prints the weight bytes each format reads per model-worth and the copy bandwidth
measured in the same run: "floor" = bytes / bandwidth, the batch-1 bound. ``--cached``: one copy
of each layer's weight called 30 times, so the layers' weights (~2 MB of int4) stay in the caches:
what a format costs when the DRAM read is not the limit (against the default: how much of a
model-worth is the read).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine import linear as lin
from kernels import cpu_ext
from kernels import quant_reference as qr

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
HEAD_SHAPE = (49152, 576)
LAYERS = 30


def best_ms(fn: Callable[[], object], reps: int = 15) -> float:
    """Best of ``reps``: on a shared machine one descheduled OpenMP thread stalls the whole call,
    so the minimum is the figure that compares formats, not the median."""
    fn()
    return 1e3 * min(_timed(fn) for _ in range(reps))


def copy_bandwidth(num_bytes: int = 1 << 28) -> float:
    """(read + written) bytes / s of a large float32 tensor copy, best of 5."""
    src = torch.rand(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * num_bytes / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prepare(fmt: str, w: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(x -> x @ w^T in format ``fmt``, bytes of weight data it reads)."""
    ops = cpu_ext.load_ops()
    if fmt == "f32-mkl":
        return (lambda x: F.linear(x, w)), w.numel() * 4
    if fmt == "f32-split":
        return (lambda x: lin.split_linear(x, w)), w.numel() * 4
    if fmt == "f32-direct":
        return (lambda x: ops.dense_linear_f32(x, w)), w.numel() * 4
    if fmt in ("bf16-onednn", "bf16-packed"):
        packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None)
        op = ops.dense_linear if fmt == "bf16-packed" else lin.onednn_linear
        return (lambda x: op(x.bfloat16(), packed)), w.shape[0] * w.shape[1] * 2
    if fmt == "int8-torch":
        q, s = qr.quantize_int8(w)
        sf = s.float()[:, 0].contiguous()
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, sf)), q.numel() + sf.numel() * 4
    if fmt in ("int4-torch", "int4-torch-f32"):
        dt = torch.float32 if fmt == "int4-torch-f32" else torch.bfloat16
        n, k = w.shape
        g = w.reshape(n, k // 32, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
        # torch's zero point is the value of q = 8: w = (q - 8) * scale + zero
        zero = lo + 8 * scale
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dt)  # [K/32, N, 2]
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dt), packed, 32, sz)
                ), n * k // 2 + sz.numel() * sz.element_size()  # fmt: skip
    if fmt in ("int8", "int8-bf16", "int8-g32"):
        q, s = qr.quantize_int8(w, 32 if fmt == "int8-g32" else None)
        dt = torch.bfloat16 if fmt == "int8-bf16" else torch.float32
        return (lambda x: ops.int8_linear(x.to(dt), q, s)), q.numel() + s.numel() * 2
    if fmt in ("int4", "int4-bf16"):
        q, d, m = qr.quantize_int4(w)
        if fmt == "int4":
            return (lambda x: ops.int4_linear(x, q, d, m)), q.numel() + 4 * d.numel()
        return (lambda x: ops.int4_linear(x.bfloat16(), q, d, m)), q.numel() + 4 * d.numel()
    if fmt in ("int4-a8", "int8-g32-a8"):
        w_q = qr.quantize_int4(w) if fmt == "int4-a8" else qr.quantize_int8(w, 32)
        packed, dm = cpu_ext.pack_a8(fmt[:4], w_q)
        return (lambda x: ops.linear_a8(x.bfloat16(), packed, dm)
                ), packed.numel() + dm.numel() * 2  # fmt: skip
    if fmt in ("int4-packed", "int4-bf16-packed", "int8-packed", "int8-bf16-packed"):
        w_q = qr.quantize_int4(w) if fmt.startswith("int4") else qr.quantize_int8(w)
        packed, dm = cpu_ext.pack_float(fmt[:4], w_q)
        dt = torch.bfloat16 if "bf16" in fmt else torch.float32
        return (lambda x: ops.linear_packed(x.to(dt), packed, dm)
                ), packed.numel() + dm.numel() * 2  # fmt: skip
    if fmt in ("int4-deq-f32", "int4-deq-bf16"):  # large steps without a dense copy
        q, d, m = qr.quantize_int4(w)
        dt = torch.float32 if fmt == "int4-deq-f32" else torch.bfloat16
        return (lambda x: F.linear(x.to(dt), cpu_ext.int4_dequantize(q, d, m, dt))
                ), q.numel() + 4 * d.numel()  # fmt: skip
    raise ValueError(f"unknown format {fmt!r}")


FORMATS = (
    "f32-mkl f32-split f32-direct bf16-onednn bf16-packed int8-torch int4-torch int4-torch-f32 int8"
    " int8-bf16 int8-g32 int4 int4-bf16 int4-packed int4-bf16-packed int8-packed int8-bf16-packed"
    " int4-a8 int8-g32-a8 int4-deq-f32 int4-deq-bf16"
).split()


def time_format(
    fmt: str, layers: dict, head: torch.Tensor, rows: list[int], gen, cached: bool = False
) -> tuple:
    """(weight MB of the layers, ms per M, head MB, head ms per M) of one format; ``cached``: the
    first weight of each shape prepared once and called ``LAYERS`` times."""
    if cached:
        fns = {s: [prepare(fmt, layers[s][0])] * LAYERS for s in LAYER_SHAPES}
    else:
        fns = {s: [prepare(fmt, w) for w in layers[s]] for s in LAYER_SHAPES}
    nbytes = sum(b for s in LAYER_SHAPES for _, b in fns[s])
    if fmt == "f32-split":  # the split must stay bit-identical to F.linear
        x = torch.randn(rows[0], 576, generator=gen)
        assert all(torch.equal(lin.split_linear(x, w), F.linear(x, w)) for w in layers[(960, 576)])
    times = []
    for m in rows:
        xs = {s: torch.randn(m, s[1], generator=gen) for s in LAYER_SHAPES}
        times.append(best_ms(lambda xs=xs: [f(xs[s]) for s in LAYER_SHAPES for f, _ in fns[s]]))
    head_fn, head_bytes = prepare(fmt, head)
    head_times = [best_ms(lambda m=m: head_fn(torch.randn(m, HEAD_SHAPE[1]))) for m in rows]
    return nbytes, times, head_bytes, head_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--cached", action="store_true", help="one weight per shape, called 30 times")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    layers = {s: [torch.randn(*s, generator=gen) * 0.05 for _ in range(LAYERS)]
              for s in LAYER_SHAPES}  # fmt: skip
    head = torch.randn(*HEAD_SHAPE, generator=gen) * 0.05
    bandwidth = copy_bandwidth()
    print(f"torch threads {args.threads}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)")
    copies = "one copy per shape, called" if args.cached else "distinct"
    print(f"ms per {LAYERS} layers ({copies}) of {LAYER_SHAPES} | LM head {HEAD_SHAPE}; best of 15")
    cols = " ".join(f"{'M=' + str(m):>7}" for m in rows)
    print(f"{'format':>12} {'MB':>6} {'floor':>6} {cols} | {'MB':>5} {'floor':>5} {cols}")
    for fmt in args.formats.split(","):
        nbytes, times, hbytes, htimes = time_format(fmt, layers, head, rows, gen, args.cached)
        print(f"{fmt:>12} {nbytes / 1e6:6.1f} {nbytes / bandwidth * 1e3:6.2f} "
              + " ".join(f"{t:7.2f}" for t in times)
              + f" | {hbytes / 1e6:5.1f} {hbytes / bandwidth * 1e3:5.2f} "
              + " ".join(f"{t:7.2f}" for t in htimes), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
