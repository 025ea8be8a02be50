"""KV transfer overlapped with prefill: TTFT and time to the second token for long prompts, with
the KV sent in layer groups while the forward runs against sent after it (one run, same prompts).

    python -m bench.overlap [--config configs/local.yaml] [--input-len 2048] [--groups 6]
                            [--requests 8]

Each topology variant gets one-chunk prefill (chunk_size and max_batch_tokens >= the prompt), so
the whole prompt's forward is what a group's copy can hide behind. Requests go one at a time
(closed loop, concurrency 1): TTFT is when prefill's token arrives (the transfer is not on its
path), the second token is decode's first, which needs every KV byte landed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import yaml

from bench.openai_stream import send_request
from bench.tandem_bench import first_model, machine, warm_up
from bench.tandem_server import TandemServer
from bench.workloads import WorkloadSpec, build_requests

ROOT = Path(__file__).resolve().parents[1]


def variant(base: str, out: Path, groups: int, input_len: int) -> str:
    config = yaml.safe_load((ROOT / base).read_text())
    budget = max(input_len + 64, config["pools"]["prefill"]["scheduler"]["max_batch_tokens"])
    config["pools"]["prefill"]["scheduler"].update(chunk_size=budget, max_batch_tokens=budget)
    config["kv_transfer"]["layer_groups"] = groups
    config["model"]["max_model_len"] = max(config["model"]["max_model_len"], input_len + 64)
    path = out / f"groups-{groups}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def measure(url: str, specs: list) -> tuple[list[float], list[float]]:
    model = await first_model(url, {})
    await warm_up(url, model, {}, 2, 600)
    ttft, second = [], []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for spec in specs:
            r = await send_request(session, url, "completions", model, spec, {},
                                   time.perf_counter())  # fmt: skip
            if not r.ok or not r.itls_s:
                raise RuntimeError(f"request failed: {r.error}")
            ttft.append(r.ttft_s)
            second.append(r.ttft_s + r.itls_s[0])
    return ttft, second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--input-len", type=int, default=2048 - 64)
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--requests", type=int, default=8)
    args = p.parse_args(argv)
    spec = WorkloadSpec("fixed", input_len=args.input_len, output_len=4)
    specs = build_requests(spec, args.requests, seed=5)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for groups in (1, args.groups):
            config = variant(args.config, Path(tmp), groups, args.input_len)
            with TandemServer(config, Path(tmp) / f"server-{groups}.log") as server:
                rows[groups] = asyncio.run(measure(server.wait_ready(), specs))
    base_ttft, base_second = (np.asarray(x) * 1000 for x in rows[1])
    for groups, (ttft, second) in rows.items():
        ttft, second = np.asarray(ttft) * 1000, np.asarray(second) * 1000
        print(f"layer_groups {groups}: TTFT p50 {np.median(ttft):.0f} ms "
              f"({np.median(ttft) / np.median(base_ttft):.2f}x), p99 {np.percentile(ttft, 99):.0f}"
              f" ms; second token p50 {np.median(second):.0f} ms "
              f"({np.median(second) / np.median(base_second):.2f}x), "
              f"p99 {np.percentile(second, 99):.0f} ms", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
