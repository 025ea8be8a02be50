"""Decode step time per dtype / weight quantization, against the weight-bandwidth floor.

    python -m bench.decode_step                                   # the default configs, 1/16/64
    python -m bench.decode_step --configs float32:none,auto:int4+dense --batches 1

Each config is ``dtype:quantization`` (``+dense``: ``keep_dense_weights``; ``+a8``:
``quantize_activations``; ``+perop``: no one-call decoder layers,
``LlamaForCausalLM.fuse_layers = False``; ``+4k``: the quantized weights left on 4 KiB pages,
``LlamaForCausalLM.huge_pages = False``). For each batch size B
the engine decodes B requests together (random 40-token prompts, 128 new tokens, ignore_eos,
greedy) and the median decode step is reported, with the tokens/s it implies (B / step).
Batch-1 floor = bytes of weights one step reads (``LlamaForCausalLM.weight_bytes``: every linear
once, the LM head in full) / copy bandwidth measured in the same run ((read + written) bytes per
second of a 256 MiB copy, the better of a measurement before and after).

``--alternate-fuse``: one engine per config, its decode steps alternating between one C++ call per
decoder layer and the per-op path (``fuse_layers``), so both see the same load; prints the two
medians and their ratio per batch size. ``--alternate-team``: the same, between those layers'
parallel loops in one thread team (kernels/csrc/team.h) and an OpenMP region per loop
(``set_layer_team``).

``--step-thread second``: build each engine on the main thread but step it on a second thread,
as workers did before they built the engine on their loop thread (engine/worker_base.py): two
threads that have run OpenMP regions, one team each, more teams' threads than CPUs, so libgomp's
barriers sleep instead of spinning.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

import torch

from bench.linear import copy_bandwidth
from bench.offline_throughput import load_average, machine
from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.model import LlamaForCausalLM

DEFAULT = "float32:none,bfloat16:none,float32:int8,float32:int4,auto:int4+dense"


def engine_for(spec: str, threads: int, max_batch: int) -> EngineCore:
    dtype, quant = spec.split(":")
    quant, *flags = quant.split("+")
    config = EngineConfig(dtype=dtype, quantization=quant, keep_dense_weights="dense" in flags,
                          quantize_activations="a8" in flags, num_blocks=max_batch * 12 + 16,
                          max_num_seqs=max_batch, num_threads=threads)  # fmt: skip
    LlamaForCausalLM.huge_pages = "4k" not in flags
    engine = EngineCore(config)
    engine.model.fuse_layers = "perop" not in flags
    return engine


def decode_steps(
    engine: EngineCore,
    batch: int,
    new_tokens: int,
    seed: int,
    alternate: Callable[[bool], None] | None = None,
) -> list[float]:
    """Times of the full-batch decode steps; ``alternate(on)`` before each step, on for the even
    ones."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"s{seed}-{i}", torch.randint(100, 40000, (40,), generator=g).tolist(),
                           params)  # fmt: skip
    times = []
    while engine.has_unfinished():
        if alternate is not None:
            alternate(len(times) % 2 == 0)
        batch_ = engine.scheduler.schedule()
        t0 = time.perf_counter()
        out = engine.runner.execute(batch_)
        engine.postprocess(batch_, out)
        if not batch_.is_prefill and len(batch_.seqs) == batch:
            times.append(time.perf_counter() - t0)
    return times


def on_thread(which: str, fn):
    """fn() on this thread, or on a new one ("second")."""
    if which == "main":
        return fn()
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--step-thread", choices=["main", "second"], default="main")
    ap.add_argument("--alternate-fuse", action="store_true")
    ap.add_argument("--alternate-team", action="store_true")
    args = ap.parse_args()
    if args.alternate_fuse or args.alternate_team:
        return alternate(args)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {machine()}; threads {args.threads}, steps on the {args.step_thread} thread; "
          f"load avg {load_average()}")  # fmt: skip
    bandwidth = copy_bandwidth()
    rows = []
    for spec in args.configs.split(","):
        engine = engine_for(spec, args.threads, max(batches))
        decode_steps(engine, 2, 4, seed=99)  # warm-up

        def medians(e: EngineCore = engine) -> dict[int, float]:
            return {b: statistics.median(decode_steps(e, b, args.new_tokens, seed=b))
                    for b in batches}  # fmt: skip

        steps = on_thread(args.step_thread, medians)
        rows.append((spec, engine.config.torch_dtype, engine.model.weight_bytes, steps))
        print(f"  {spec} done (load avg {load_average()})", flush=True)
        del engine
    bandwidth = max(bandwidth, copy_bandwidth())
    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write); load avg {load_average()}")
    cols = " ".join(f"{'B=' + str(b) + ' ms':>9} {'tok/s':>6}" for b in batches)
    print(f"{'config':>18} {'dtype':>9} {'weights MB':>10} {'floor ms':>8} {'B=1/floor':>9} {cols}")
    for spec, dtype, nbytes, steps in rows:
        floor = nbytes / bandwidth
        ratio = f"{steps[1] / floor:9.2f}" if 1 in steps else f"{'-':>9}"
        cells = " ".join(f"{steps[b] * 1e3:9.2f} {b / steps[b]:6.0f}" for b in batches)
        print(f"{spec:>18} {str(dtype).removeprefix('torch.'):>9} {nbytes / 1e6:10.1f} "
              f"{floor * 1e3:8.2f} {ratio} {cells}")  # fmt: skip


def alternate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    on, off = ("team", "no team") if args.alternate_team else ("fused", "per-op")
    print(f"machine: {machine()}; threads {args.threads}; load avg {load_average()}")
    print(f"{'config':>18} {'batch':>5} {on + ' ms':>12} {off + ' ms':>12} {on + '/' + off:>14}")
    for spec in args.configs.split(","):
        engine = engine_for(spec, args.threads, max(batches))
        model = engine.model
        if args.alternate_team:
            switch = model.set_layer_team
        else:
            switch = partial(setattr, model, "fuse_layers")
        decode_steps(engine, 2, 4, seed=99)  # warm-up
        for b in batches:
            times = decode_steps(engine, b, args.new_tokens, seed=b, alternate=switch)
            a, z = statistics.median(times[0::2]), statistics.median(times[1::2])
            print(f"{spec:>18} {b:5d} {a * 1e3:12.2f} {z * 1e3:12.2f} {a / z:14.3f}",
                  flush=True)  # fmt: skip
        del engine
    print(f"load avg {load_average()}")


if __name__ == "__main__":
    main()
