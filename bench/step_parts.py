"""Where a decode step's time goes: the engine's step parts timed in place.

    python -m bench.step_parts --config auto:int4+dense --batch 1

One engine (``bench.decode_step``'s config syntax), ``--batch`` requests of random 40-token
prompts decoding ``--new-tokens`` greedy tokens, twice; each part (scheduling, input preparation,
the model's forward, the LM head, sampling, output) is wrapped with a timer, and its median over
the second run's steps is printed next to the median ``engine.step``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from bench.decode_step import engine_for
from bench.offline_throughput import load_average, machine
from core.sampling_params import SamplingParams


def timed(times: list[float], fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="auto:int4+dense")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = engine_for(args.config, args.threads, args.batch)
    parts: dict[str, list[float]] = defaultdict(list)
    runner, model = engine.runner, engine.model
    for label, obj, name in (("schedule", engine.scheduler, "schedule"),
                             ("prepare inputs", runner, "prepare"),
                             ("model forward (layers, final norm)", model, "forward"),
                             ("LM head", model, "compute_logits"),
                             ("sample", runner, "sampler"),
                             ("postprocess", engine, "postprocess")):  # fmt: skip
        setattr(obj, name, timed(parts[label], getattr(obj, name)))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for run in range(2):  # the first warms up
        for times in parts.values():
            times.clear()
        g = torch.Generator().manual_seed(run)
        for i in range(args.batch):
            prompt = torch.randint(100, 40000, (40,), generator=g).tolist()
            engine.add_request(f"r{run}-{i}", prompt, params)
        steps = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
    print(f"machine: {machine()}; threads {args.threads}; load avg {load_average()}")
    print(f"{args.config}, batch {args.batch}, one C++ call per layer: {model.fuse_layers}")
    print(f"  {'engine.step':36s} {statistics.median(steps[1:]) * 1e3:7.2f} ms")
    # each list holds one prefill among the decode steps: the median is not moved by it
    for label, times in parts.items():
        print(f"  {label:36s} {statistics.median(times) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
