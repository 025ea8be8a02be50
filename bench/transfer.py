"""KV-transfer bandwidth: nixl and tcp between two OS processes, against local copy bandwidth.

    .venv/bin/python -m bench.transfer [--backends nixl tcp] [--repeats 3] [--json out.json]

For each backend, model layout (SmolLM2-135M, Llama-3-8B) and block size (16, 32 tokens) a decode
process is spawned with a bf16 KVCache; this process (prefill) WRITEs 1, 16 and 256 MiB of blocks
into it, the destination ids a random permutation (so no two blocks merge: the worst case for
descriptor count). Time is from ``send`` to ``TransferDone`` in ``poll``; the best of
``--repeats`` is kept. In the same run: ``torch`` copy bandwidth of a 256 MiB buffer, and the time
to move one 4096-token prompt's KV for Llama-3-8B (bf16, and bf16 -> FP8 on the wire).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv_cache import KVCache, KVCacheSpec
from kvtransfer import KVTransferConfig, make_receiver, make_sender
from kvtransfer.protocol import TransferDone, TransferSpec
from kvtransfer.regions import Fp8Staging

MiB = 1 << 20
SEND_SECONDS: dict[str, float] = {}  # request id -> time spent inside sender.send()


@dataclass(frozen=True)
class Layout:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


LAYOUTS = [Layout("SmolLM2-135M", 30, 3, 64), Layout("Llama-3-8B", 32, 8, 128)]
PROMPT_TOKENS = 4096


def spec_of(layout: Layout, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
    return KVCacheSpec(layout.num_layers, layout.num_kv_heads, layout.head_dim, block_size, dtype)


def copy_gbps(num_bytes: int = 256 * MiB, repeats: int = 5) -> float:
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best / 1e9


def serve(spec: KVCacheSpec, num_blocks: int, backend: str, out: Any, stop: Any) -> None:
    """Decode side: own process, polls like a worker loop until told to stop."""
    cache = KVCache(spec, num_blocks)
    # Fault every page in now, as a decode worker that has run a while has: otherwise the first
    # WRITEs into a fresh cache pay the receiver's page faults and measure the kernel, not us.
    cache.data.view(torch.uint8).fill_(0)
    receiver = make_receiver(cache, KVTransferConfig(backend=backend), "bench")
    out.put(receiver.address)
    while stop.empty():
        receiver.poll()
        time.sleep(0.001)
    receiver.close()


class Decode:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, backend: str):
        ctx = mp.get_context("spawn")
        self.out, self.stop = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=serve, args=(spec, num_blocks, backend, self.out, self.stop))
        self.proc.start()
        self.address = self.out.get(timeout=120)

    def close(self) -> None:
        self.stop.put(True)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def timed_send(sender: Any, peer: str, n: int, dst_pool: int, rid: str) -> TransferDone:
    """Send n blocks to random destinations and poll until done. The time spent inside
    ``send`` itself (how long a worker loop is held) goes to SEND_SECONDS."""
    dst = random.Random(rid).sample(range(dst_pool), n)
    t0 = time.perf_counter()
    sender.send(TransferSpec(rid, tuple(range(n)), tuple(dst)), peer)
    SEND_SECONDS[rid] = time.perf_counter() - t0
    while True:
        for ev in sender.poll():
            if not isinstance(ev, TransferDone):
                raise RuntimeError(f"transfer failed: {ev}")
            return ev
        time.sleep(0.0001)


def bench_pair(
    backend: str, layout: Layout, block_size: int, sizes_mib: list[int], repeats: int
) -> list[dict]:
    spec = spec_of(layout, block_size, torch.bfloat16)
    per_block = spec.bytes_per_block()
    max_blocks = max(-(-s * MiB // per_block) for s in sizes_mib)
    want_prompt = layout.name == "Llama-3-8B" and block_size == 16
    prompt_blocks = PROMPT_TOKENS // block_size
    num_blocks = max(max_blocks, prompt_blocks if want_prompt else 0) + 8
    decode = Decode(spec, num_blocks, backend)
    cache = KVCache(spec, num_blocks)
    cache.data.normal_()
    sender = make_sender(cache, KVTransferConfig(backend=backend, timeout_s=120), "bench")
    rows = []
    try:
        peer = sender.connect(decode.address)
        timed_send(sender, peer, 1, num_blocks, "warm-up")
        for size in sizes_mib:
            n = -(-size * MiB // per_block)
            best = min(
                (timed_send(sender, peer, n, num_blocks, f"{size}-{i}") for i in range(repeats)),
                key=lambda e: e.seconds,
            )
            rows.append(dict(kind="bandwidth", backend=backend, layout=layout.name,
                             block_size=block_size, mib=size, num_blocks=n,
                             bytes=best.num_bytes, seconds=best.seconds,
                             send_seconds=SEND_SECONDS[best.request_id],
                             gbps=best.num_bytes / best.seconds / 1e9))  # fmt: skip
        if want_prompt:
            best = min(
                (timed_send(sender, peer, prompt_blocks, num_blocks, f"prompt-{i}")
                 for i in range(repeats)),
                key=lambda e: e.seconds,
            )  # fmt: skip
            rows.append(dict(kind="prompt", backend=backend, layout=layout.name, wire="bf16",
                             bytes=best.num_bytes, seconds=best.seconds))  # fmt: skip
    finally:
        sender.close()
        decode.close()
    return rows


def bench_prompt_fp8(backend: str, repeats: int) -> dict:
    """bf16 prefill cache -> FP8 decode cache: quantize into staging + ship FP8 and scales."""
    layout = LAYOUTS[1]
    n = PROMPT_TOKENS // 16
    decode = Decode(spec_of(layout, 16, torch.float8_e4m3fn), n + 8, backend)
    cache = KVCache(spec_of(layout, 16, torch.bfloat16), n + 8)
    cache.data.normal_()
    config = KVTransferConfig(backend=backend, timeout_s=120, staging_blocks=n)
    sender = make_sender(cache, config, "bench")
    try:
        peer = sender.connect(decode.address)
        timed_send(sender, peer, 1, n + 8, "warm-up")
        best = min((timed_send(sender, peer, n, n + 8, f"fp8-{i}") for i in range(repeats)),
                   key=lambda e: e.seconds)  # fmt: skip
    finally:
        sender.close()
        decode.close()
    # the quantization alone (kernels.quantize_fp8 into a staging buffer), same blocks
    staging = Fp8Staging(cache.spec, n, "cpu")
    t0 = time.perf_counter()
    staging.stage(cache, list(range(n)), list(range(n)), 0, layout.num_layers)
    quantize_s = time.perf_counter() - t0
    return dict(kind="prompt", backend=backend, layout=layout.name, wire="fp8",
                bytes=best.num_bytes, seconds=best.seconds,
                quantize_seconds=quantize_s)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["nixl", "tcp"])
    ap.add_argument("--sizes-mib", nargs="+", type=int, default=[1, 16, 256])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    copy_start = copy_gbps()
    rows: list[dict] = []
    for backend in args.backends:
        for layout in LAYOUTS:
            for bs in args.block_sizes:
                rows += bench_pair(backend, layout, bs, args.sizes_mib, args.repeats)
        rows.append(bench_prompt_fp8(backend, repeats=1))  # CPU quantization: seconds per run
    # The machine is shared: take copy bandwidth at both ends and keep the best, so the ratios
    # below are conservative.
    copy_end = copy_gbps()
    copy = max(copy_start, copy_end)
    print(f"torch copy bandwidth (256 MiB, {torch.get_num_threads()} threads): start "
          f"{copy_start:.2f} GB/s, end {copy_end:.2f} GB/s, reference {copy:.2f} GB/s")  # fmt: skip

    print("\n| backend | layout | block | MiB | blocks | GB/s | % of copy | send() ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "bandwidth":
            pct = 100 * r["gbps"] / copy
            print(f"| {r['backend']} | {r['layout']} | {r['block_size']} | {r['mib']} | "
                  f"{r['num_blocks']} | {r['gbps']:.2f} | {pct:.0f}% | "
                  f"{1e3 * r['send_seconds']:.1f} |")  # fmt: skip
    print(f"\n| backend | 4k-token prompt, {LAYOUTS[1].name} | wire | MiB | ms | quantize |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "prompt":
            q = f"{1e3 * r['quantize_seconds']:.0f} ms" if "quantize_seconds" in r else "-"
            print(f"| {r['backend']} | {PROMPT_TOKENS} tokens | {r['wire']} | "
                  f"{r['bytes'] / MiB:.0f} | {1e3 * r['seconds']:.0f} | {q} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": [copy_start, copy_end], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except queue.Empty:
        raise SystemExit("a decode process did not start") from None
