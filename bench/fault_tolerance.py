"""What a kill -9 of a worker costs the requests in flight, measured on a served topology.

    python -m bench.fault_tolerance --config configs/local-2p2d.yaml [--requests 24] [--out F]

For each role (decode, prefill) the same burst of streamed requests runs twice on one server in
one run: undisturbed (the baseline), then with ``kill -9`` of that role's worker ``<role>-0``
while the requests are in the stage that worker serves (decoding for decode, prefilling for
prefill). Reported per role:

    finished whole     requests that got every token they asked for (ignore_eos), no error
    TTFT p50 / p99     baseline -> with the kill (a retry before token 1 adds here)
    stall p50 / p99    each request's longest gap between two tokens (a migration adds here)
    back to strength   kill -> the replacement joined (tandem_worker_restarts_total + 1)

The server's CPUs are shared by every worker, so the figures are for this topology on this
machine; compare the two runs of a role, which share everything but the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.openai_stream import send_request
from bench.serving_metrics import RequestResult, distribution
from bench.tandem_bench import first_model, machine, warm_up
from bench.tandem_server import TandemServer
from bench.workloads import RequestSpec, WorkloadSpec, build_requests

WORKER_LINE = re.compile(r"tandem worker (\S+) ready in pid (\d+)")
SCENARIOS = {  # role -> (prompt tokens, output tokens)
    "decode": (100, 64),
    "prefill": (1000, 16),
}


def worker_pid(log_path: Path, name: str) -> int:
    """The pid of ``name``'s latest incarnation, from the server's log."""
    pids = [int(m.group(2)) for m in WORKER_LINE.finditer(log_path.read_text())
            if m.group(1) == name]  # fmt: skip
    if not pids:
        raise RuntimeError(f"no 'tandem worker {name} ready' line in {log_path}")
    return pids[-1]


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    text = await (await session.get(f"{url}/metrics")).text()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


async def wait_for_stage(session: aiohttp.ClientSession, url: str, role: str) -> None:
    """Until the burst is in the stage ``role`` serves."""
    if role == "decode":
        start = await metric(session, url, "tandem_inter_token_latency_seconds_count")
        while await metric(session, url, "tandem_inter_token_latency_seconds_count") < start + 48:
            await asyncio.sleep(0.02)
    else:
        while await metric(session, url, "tandem_kv_blocks_used", pool="prefill") == 0:
            await asyncio.sleep(0.02)


async def burst(
    url: str, model: str, specs: list[RequestSpec], kill: tuple[str, int] | None
) -> tuple[list[RequestResult], float | None]:
    """All ``specs`` at once; with ``kill`` = (role, pid) that worker is killed mid-burst.
    Returns the results and the seconds from the kill to its replacement joining."""
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        requests = [asyncio.ensure_future(send_request(session, url, "completions", model, s,
                                                       {}, start)) for s in specs]  # fmt: skip
        back_s = None
        if kill is not None:
            role, pid = kill
            restarts = await metric(session, url, "tandem_worker_restarts_total", pool=role)
            await wait_for_stage(session, url, role)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            while await metric(session, url, "tandem_worker_restarts_total", pool=role) <= restarts:
                await asyncio.sleep(0.05)
            back_s = time.monotonic() - killed
        results = await asyncio.gather(*requests)
    return list(results), back_s


def summarize(results: list[RequestResult], specs: list[RequestSpec]) -> dict:
    whole = sum(r.ok and r.output_tokens == s.output_len for r, s in zip(results, specs,
                                                                           strict=True))
    ok = [r for r in results if r.ok]
    return {
        "finished_whole": whole,
        "requests": len(results),
        "errors": sorted({r.error for r in results if not r.ok}),
        "ttft_ms": distribution([r.ttft_s for r in ok]),
        "stall_ms": distribution([max(r.itls_s, default=0.0) for r in ok]),
    }


def report(role: str, base: dict, hit: dict, back_s: float) -> str:
    def pair(key: str, p: str) -> str:
        return f"{base[key][p]:.0f} -> {hit[key][p]:.0f}"

    return (f"kill -9 {role}-0: finished whole {hit['finished_whole']}/{hit['requests']} "
            f"(undisturbed {base['finished_whole']}/{base['requests']}); "
            f"TTFT p50 {pair('ttft_ms', 'median')} ms, p99 {pair('ttft_ms', 'p99')} ms; "
            f"stall p50 {pair('stall_ms', 'median')} ms, p99 {pair('stall_ms', 'p99')} ms; "
            f"back to full strength in {back_s:.1f} s")  # fmt: skip


async def run_all(url: str, log_path: Path, num_requests: int) -> dict:
    model = await first_model(url, {})
    await warm_up(url, model, {}, 4, 300)
    out = {}
    for i, (role, (input_len, output_len)) in enumerate(SCENARIOS.items()):
        spec = WorkloadSpec("fixed", input_len=input_len, output_len=output_len)
        runs = {}
        for j, kill in enumerate((False, True)):
            # fresh random prompts per run: no run is served from another's prefix cache
            specs = build_requests(spec, num_requests, seed=100 * i + j)
            target = (role, worker_pid(log_path, f"{role}-0")) if kill else None
            results, back_s = await burst(url, model, specs, target)
            runs["kill" if kill else "undisturbed"] = {**summarize(results, specs),
                                                       "back_s": back_s}  # fmt: skip
        out[role] = runs
        print(report(role, runs["undisturbed"], runs["kill"], runs["kill"]["back_s"]),
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fault_tolerance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/local-2p2d.yaml")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = TandemServer(args.config, Path(tmp) / "server.log")
        try:
            url = server.wait_ready()
            results = asyncio.run(run_all(url, server.log_path, args.requests))
        finally:
            server.stop()
    record = {"command": " ".join(sys.argv), "config": args.config, "machine": machine(),
              "results": results}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
