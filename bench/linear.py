"""CPU linear layers at decode sizes: MKL ``F.linear`` vs the split ``engine.linear.linear``.

    python -m bench.linear                 # all torch threads of this machine
    python -m bench.linear --threads 2 --rows 1,8,64

Weights are SmolLM2-135M's shapes, 30 distinct copies of each per-layer weight (so they stream
from DRAM as in a real step, not from cache) plus the [49152, 576] LM head; float32. For each
row count M it prints ms per model-worth of matmuls for: plain ``F.linear``; the split bmm with
one row block per thread and with ``BLOCKS_PER_THREAD`` per thread (the engine's choice); and,
for the LM head, oneDNN on the packed weight (``Linear.pack_onednn``). It also checks that the
split is bit-identical to ``F.linear``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from engine import linear as lin

LAYER_SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
HEAD_SHAPE = (49152, 576)
LAYERS = 30


def best_ms(fn, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]  # median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", default="1,8,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = {s: [torch.randn(*s, generator=gen) for _ in range(LAYERS)] for s in LAYER_SHAPES}
    head = lin.Linear(HEAD_SHAPE[1], HEAD_SHAPE[0])
    with torch.no_grad():
        head.weight.normal_(generator=gen)
    dense_head = head.weight.detach()
    packed = head.pack_onednn()
    print(f"torch threads {args.threads}; ms per {LAYERS} layers of {LAYER_SHAPES} (median of 10)")
    print(f"{'M':>4} {'F.linear':>9} {'split/thr':>10} {'split x3':>9} {'identical':>9} | "
          f"{'head MKL':>8} {'head split':>10} {'head oneDNN':>11}")  # fmt: skip
    for m in (int(r) for r in args.rows.split(",")):
        xs = {s: torch.randn(m, s[1], generator=gen) for s in LAYER_SHAPES}

        def run(fn, xs=xs):
            return best_ms(lambda: [fn(xs[s], w) for s in LAYER_SHAPES for w in layers[s]])

        plain = run(F.linear)
        split3 = run(lin.linear)
        saved = lin.BLOCKS_PER_THREAD
        lin.BLOCKS_PER_THREAD = 1
        split1 = run(lin.linear)
        lin.BLOCKS_PER_THREAD = saved
        same = all(torch.equal(lin.linear(xs[s], layers[s][0]), F.linear(xs[s], layers[s][0]))
                   for s in LAYER_SHAPES)  # fmt: skip
        x = torch.randn(m, HEAD_SHAPE[1], generator=gen)
        head_mkl = best_ms(lambda x=x: F.linear(x, dense_head))
        head_split = best_ms(lambda x=x: lin.linear(x, dense_head))
        head_dnn = best_ms(lambda x=x: head(x)) if packed else float("nan")
        print(f"{m:4d} {plain:9.1f} {split1:10.1f} {split3:9.1f} {str(same):>9} | "
              f"{head_mkl:8.2f} {head_split:10.2f} {head_dnn:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
