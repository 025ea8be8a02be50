"""FP8 vs full-precision KV cache at one fixed KV memory budget: capacity and throughput.

    python -m bench.fp8_kv                                  # 64 MiB, 24 requests of 448 + 64
    python -m bench.fp8_kv --budget-mib 32 --num-requests 8 # a quick run

Capacity (exact, from ``KVCacheSpec``): blocks, tokens of KV and how many ``--seq-len``-token
sequences fit in ``--budget-mib``, for float32 (our CPU default), bfloat16 (arithmetic only: a
16-bit cache is what a GPU deployment compares against) and fp8_e4m3 (+ its float32 scales).

Throughput: the same engine (builtin SmolLM2-135M; ``--dtype`` / ``--quantization`` weights,
float32 unquantized by default) with ``kv_cache_bytes`` = the budget, for the model dtype's
cache and FP8 in one process, on the same requests: ``--num-requests`` random-token prompts
of ``--seq-len - --max-new`` tokens, ``--max-new`` greedy tokens each (ignore_eos), all
submitted at once, so the running batch is limited by the KV budget (not by ``max_num_seqs``).
Reported: output tokens / wall time (prefill included), decode tokens / decode-step time, the
mean and max running batch in decode steps, and preemptions (a sequence
that cannot grow is evicted and recomputed later).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import torch

from bench.offline_throughput import load_average, machine
from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore, build_model
from engine.kv_cache import KVCacheSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Capacity:
    name: str
    bytes_per_block: int
    num_blocks: int
    num_tokens: int
    num_seqs: int  # whole --seq-len sequences that fit


@dataclass(frozen=True)
class Throughput:
    name: str
    seconds: float
    output_tokens: int
    decode_seconds: float
    decode_tokens: int
    mean_batch: float  # running sequences per decode step
    max_batch: int
    num_preemptions: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds


def capacity(name: str, spec: KVCacheSpec, budget: int, seq_len: int) -> Capacity:
    blocks = spec.num_blocks_for_budget(budget)
    per_seq = -(-seq_len // spec.block_size)
    return Capacity(name, spec.bytes_per_block(), blocks, blocks * spec.block_size,
                    blocks // per_seq)  # fmt: skip


def run(engine: EngineCore, name: str, prompts: list[list[int]], max_new: int) -> Throughput:
    params = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{name}-{i}", p, params)
    decode_s, decode_tok, batches, out_tok = 0.0, 0, [], 0
    start = time.perf_counter()
    while engine.has_unfinished():
        # EngineCore.step() spelled out, to time decode steps and see their batch size
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        if not batch:
            continue
        deltas = engine.postprocess(batch, engine.runner.execute(batch))
        n = sum(len(d.token_ids) for d in deltas)
        out_tok += n
        if not batch.is_prefill:
            decode_s += time.perf_counter() - t0
            decode_tok += n
            batches.append(len(batch.seqs))
    seconds = time.perf_counter() - start
    assert out_tok == len(prompts) * max_new, (out_tok, len(prompts) * max_new)
    assert engine.kv.num_used_blocks == 0
    return Throughput(name, seconds, out_tok, decode_s, decode_tok, sum(batches) / len(batches),
                      max(batches), engine.scheduler.num_preemptions)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-mib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512, help="prompt + output tokens")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="model.dtype (auto: per CPU)")
    ap.add_argument("--quantization", default="none", help="none | int8 | int4 (+dense)")
    args = ap.parse_args()
    quant = args.quantization.removesuffix("+dense")
    torch.set_num_threads(args.threads)
    budget = args.budget_mib << 20
    print(f"machine: {machine()}; torch threads {args.threads}; load avg {load_average()}")

    base = EngineConfig(block_size=args.block_size, kv_cache_bytes=budget, num_threads=args.threads,
                        max_num_seqs=256, enable_prefix_caching=False, dtype=args.dtype,
                        quantization=quant,
                        keep_dense_weights=args.quantization != quant)  # fmt: skip
    print(f"model {base.torch_dtype} weights, quantization {args.quantization}")
    model_config, model = build_model(base, torch.device("cpu"))
    mc = model_config
    caps = [capacity(name, KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                       args.block_size, dt), budget, args.seq_len)
            for name, dt in DTYPES.items()]  # fmt: skip
    print(f"\nKV budget {args.budget_mib} MiB, block {args.block_size} tokens, "
          f"{args.seq_len}-token sequences")
    print(f"{'kv dtype':>9} {'B/block':>9} {'blocks':>7} {'KV tokens':>10} {'seqs':>5}")
    for c in caps:
        print(f"{c.name:>9} {c.bytes_per_block:9d} {c.num_blocks:7d} {c.num_tokens:10d} "
              f"{c.num_seqs:5d}")  # fmt: skip
    by = {c.name: c for c in caps}
    fp8 = by["fp8_e4m3"].num_blocks
    print(f"fp8 blocks / bfloat16 blocks = {fp8 / by['bfloat16'].num_blocks:.3f}; "
          f"/ float32 blocks = {fp8 / by['float32'].num_blocks:.3f}")

    gen = torch.Generator().manual_seed(args.seed)
    prompt_len = args.seq_len - args.max_new
    prompts = [torch.randint(100, mc.vocab_size, (prompt_len,), generator=gen).tolist()
               for _ in range(args.num_requests)]  # fmt: skip
    results = []
    full = str(base.kv_torch_dtype).removeprefix("torch.")  # the model dtype's cache
    for name, kv in ((full, "auto"), ("fp8_e4m3", "fp8_e4m3")):
        engine = EngineCore(replace(base, kv_cache_dtype=kv),
                            model=(model_config, model))  # fmt: skip
        run(engine, f"warm-{name}", prompts[:1], 4)  # allocator, thread pool
        results.append(run(engine, name, prompts, args.max_new))
        print(f"  {name} done (load avg {load_average()})", flush=True)

    print(f"\n{args.num_requests} requests x ({prompt_len} prompt + {args.max_new} new) tokens; "
          f"load avg after: {load_average()}")
    print(f"{'kv dtype':>9} {'wall s':>8} {'tok/s':>7} {'decode tok/s':>13} {'mean batch':>11} "
          f"{'max batch':>10} {'preempt':>8}")  # fmt: skip
    for r in results:
        print(f"{r.name:>9} {r.seconds:8.1f} {r.tokens_per_s:7.1f} {r.decode_tokens_per_s:13.1f} "
              f"{r.mean_batch:11.2f} {r.max_batch:10d} {r.num_preemptions:8d}")  # fmt: skip
    f32, q8 = results
    print(f"fp8 / {full}: tok/s {q8.tokens_per_s / f32.tokens_per_s:.2f}x, decode tok/s "
          f"{q8.decode_tokens_per_s / f32.decode_tokens_per_s:.2f}x")


if __name__ == "__main__":
    main()
