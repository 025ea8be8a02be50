"""Offline throughput: our EngineCore against HF transformers ``generate`` in one run.

    python -m bench.offline_throughput                        # 1, 8, 32, 64 sequences, all CPUs
    python -m bench.offline_throughput --sizes 1,8 --max-new 64   # a quick run
    python -m bench.offline_throughput --sizes 64 --profile 25    # + cProfile of our engine

Same model (the builtin SmolLM2-135M GGUF, dequantized to float32 on both sides), same prompts
(random token ids, 112-144 tokens, fresh per batch size so no prefix-cache hits), same planned
output lengths (uniform in [min-new, max-new]; ignore_eos on our side, min_new_tokens =
max_new_tokens on HF's, so no request stops early), same ``torch.set_num_threads``. HF runs the
batch as one left-padded ``generate`` to the longest planned length: tokens past a request's
planned length are generated but not counted (that is the cost of static batching).
tokens/s = planned output tokens / wall time including prefill.

The batch-1 decode step is also set against the memory-bandwidth floor: weight bytes read per
step (every parameter once; the tied embedding is read in full as the LM head) / copy bandwidth
measured here ((read + written) bytes / time of a large tensor copy, best of 5).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.builtin import builtin_gguf_path

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(frozen=True)
class RunResult:
    seconds: float
    decode_step_seconds: list[float]  # per decode step (ours only)


def make_workload(n: int, vocab: int, min_new: int, max_new: int, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(seed * 1000 + n)
    lens = torch.randint(112, 145, (n,), generator=gen).tolist()
    prompts = [torch.randint(100, vocab, (k,), generator=gen).tolist() for k in lens]
    out = torch.randint(min_new, max_new + 1, (n,), generator=gen).tolist()
    return Workload(prompts, out)


def run_ours(engine: EngineCore, work: Workload) -> RunResult:
    for i, (p, k) in enumerate(zip(work.prompts, work.output_lens, strict=True)):
        params = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
        engine.add_request(f"b{i}", p, params)
    decode_times: list[float] = []
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        # EngineCore.step() spelled out, to time decode steps on their own
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        out = engine.runner.execute(batch)
        deltas = engine.postprocess(batch, out)
        if not batch.is_prefill:
            decode_times.append(time.perf_counter() - t0)
        generated += sum(len(d.token_ids) for d in deltas)
    seconds = time.perf_counter() - start
    assert generated == work.num_output_tokens, (generated, work.num_output_tokens)
    return RunResult(seconds, decode_times)


def load_hf(gguf: Path):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


@torch.inference_mode()
def run_hf(model, work: Workload, pad_id: int) -> RunResult:
    width = max(len(p) for p in work.prompts)
    ids = torch.full((len(work.prompts), width), pad_id, dtype=torch.long)  # [B, S] left-padded
    mask = torch.zeros_like(ids)
    for i, p in enumerate(work.prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    n = max(work.output_lens)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, top_p=None, top_k=None, pad_token_id=pad_id)  # fmt: skip
    seconds = time.perf_counter() - start
    assert out.shape == (len(work.prompts), width + n), out.shape
    return RunResult(seconds, [])


def copy_bandwidth(num_bytes: int = 1 << 28) -> float:
    """(read + written) bytes / s of a large float32 tensor copy, best of 5."""
    src = torch.rand(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_bytes / best


def matmul_flops(m: int = 64, k: int = 576, n: int = 1536) -> float:
    """float32 FLOP/s of a decode-shaped matmul ([m, k] @ [k, n], a Llama MLP at batch m), best
    of 20: the compute ceiling a batch-m decode step meets before the bandwidth one."""
    a, w = torch.randn(m, k), torch.randn(n, k)
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                   if ln.startswith("Model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return f"{cpu}, nproc={os.cpu_count()}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,32,64", help="batch sizes, comma-separated")
    ap.add_argument("--min-new", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch intra-op threads, both sides (default: every CPU, as workers run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="cProfile our engine at the largest size; print the top N functions")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    min_new = min(args.min_new, args.max_new)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    print(f"machine: {machine()}; torch threads {args.threads}; load avg {load_average()}")
    block_size = 16
    per_seq_blocks = -(-(144 + args.max_new) // block_size)
    config = EngineConfig(model=f"builtin:{MODEL}", dtype="float32", block_size=block_size,
                          num_blocks=max(sizes) * per_seq_blocks, max_num_seqs=max(sizes),
                          num_threads=args.threads)  # fmt: skip
    engine = EngineCore(config)
    vocab = engine.model_config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bandwidth = copy_bandwidth()
    flops = matmul_flops(m=max(sizes))
    hf = None if args.skip_hf else load_hf(builtin_gguf_path(MODEL))
    pad_id = engine.model_config.eos_token_ids[0] if engine.model_config.eos_token_ids else 0

    warm = make_workload(2, vocab, 4, 4, seed=args.seed + 99)  # allocator, thread pools, caches
    run_ours(engine, warm)
    if hf is not None:
        run_hf(hf, warm, pad_id)

    rows = []
    batch1_step = None
    decode_steps: dict[int, float] = {}
    for n in sizes:
        work = make_workload(n, vocab, min_new, args.max_new, args.seed)
        ours = run_ours(engine, work)
        theirs = run_hf(hf, work, pad_id) if hf is not None else None
        if ours.decode_step_seconds:
            decode_steps[n] = statistics.median(ours.decode_step_seconds)
        if n == 1 and ours.decode_step_seconds:
            batch1_step = decode_steps[n]
        ours_tps = work.num_output_tokens / ours.seconds
        hf_tps = work.num_output_tokens / theirs.seconds if theirs else float("nan")
        waste = n * max(work.output_lens) / work.num_output_tokens  # HF's generated / planned
        rows.append((n, work.num_output_tokens, ours.seconds, ours_tps,
                     theirs.seconds if theirs else float("nan"), hf_tps, waste))  # fmt: skip
        print(f"  n={n:3d} done: ours {ours_tps:8.1f} tok/s, HF {hf_tps:8.1f} tok/s "
              f"(load avg {load_average()})", flush=True)  # fmt: skip

    print(f"\nload avg after: {load_average()}")
    print(f"{'seqs':>5} {'out tok':>8} {'ours s':>8} {'ours tok/s':>11} {'HF s':>8} "
          f"{'HF tok/s':>9} {'ours/HF':>8} {'HF gen/planned':>15}")  # fmt: skip
    for n, tok, s_ours, tps_ours, s_hf, tps_hf, waste in rows:
        print(f"{n:5d} {tok:8d} {s_ours:8.2f} {tps_ours:11.1f} {s_hf:8.2f} {tps_hf:9.1f} "
              f"{tps_ours / tps_hf:8.2f} {waste:15.2f}")  # fmt: skip
    # the machine is shared: measure again after the runs and keep the better figure
    bandwidth = max(bandwidth, copy_bandwidth())
    floor = weight_bytes / bandwidth
    print(f"\nweights {weight_bytes / 1e6:.1f} MB; copy bandwidth {bandwidth / 1e9:.2f} GB/s "
          f"(read+write); batch-1 decode floor {floor * 1e3:.2f} ms/step")  # fmt: skip
    if batch1_step is not None:
        print(f"batch-1 decode step (ours, median): {batch1_step * 1e3:.2f} ms "
              f"= {batch1_step / floor:.2f}x the floor")  # fmt: skip

    # every weight takes part in 2 FLOPs per token (the embedding once more, as the LM head)
    step_flops = 2 * max(sizes) * sum(p.numel() for p in engine.model.parameters())
    print(f"matmul {flops / 1e9:.1f} GFLOP/s at M={max(sizes)}; batch-{max(sizes)} decode "
          f"compute floor {step_flops / flops * 1e3:.0f} ms/step")  # fmt: skip
    for n, *_ in rows:
        if n in decode_steps:
            print(f"batch-{n} decode step (ours, median): {decode_steps[n] * 1e3:.1f} ms")

    if args.profile:
        work = make_workload(max(sizes), vocab, min_new, args.max_new, args.seed + 7)
        prof = cProfile.Profile()
        prof.enable()
        run_ours(engine, work)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
