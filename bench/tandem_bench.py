"""``tandem bench``: load an OpenAI-compatible server and report vLLM ``bench serve`` metrics.

    tandem bench --url http://127.0.0.1:8000 --rates 0.5,1,2            # any running server
    tandem bench --config configs/local.yaml --rates 1                   # starts tandem serve
    tandem bench --compare configs/local.yaml configs/colocated.yaml \\
        --workload mixed --rates 0.25,0.5,1 --slo ttft_ms=2000,tpot_ms=200

Each target (``--url``, ``--config``, or each ``--compare`` YAML in turn, started with
``tandem serve --port 0 --num-cpus <its CPUs>``; compared topologies must reserve equal CPUs)
gets ``--warmup`` short requests, then each load point: open loop at each of ``--rates``
(Poisson, or gamma with ``--burstiness``) or closed loop at each of ``--concurrency``. Load point
i sends the requests of seed ``--seed`` + i (bench/workloads.py): the same for every target, and
new at each load point, so that a prefix cache never serves a prompt from an earlier one.
Metrics (bench/serving_metrics.py) print per run and go to ``--out`` (JSON, rewritten after
every run, with the 1-minute load average before and after each) and a PNG plot (``--plot``).

Only loopback servers are accepted, and every run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from bench.arrivals import LoadPoint, parse_rates
from bench.load_runner import run_load
from bench.openai_stream import auth_headers, send_request
from bench.serving_metrics import Slo, summarize
from bench.tandem_server import TandemServer, config_cpus
from bench.workloads import WORKLOADS, WorkloadSpec, build_requests, warmup_requests

MAX_REQUESTS = 1024  # per load point


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running OpenAI-compatible server on this host")
    target.add_argument("--config", help="start `tandem serve` with this YAML topology")
    target.add_argument("--compare", nargs="+", metavar="YAML",
                        help="several topologies, one after the other, same requests")  # fmt: skip
    p.add_argument("--model", help="the model name to request (default: the server's first)")
    p.add_argument("--api-key", help="Bearer key (default: $OPENAI_API_KEY if set)")
    p.add_argument("--workload", choices=WORKLOADS, default="fixed")
    p.add_argument("--input-len", type=int, default=128, help="fixed / dist prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="output tokens (chat: words)")
    p.add_argument("--range-ratio", type=float, default=0.5, help="dist: +- this fraction")
    p.add_argument("--long-fraction", type=float, default=0.2, help="mixed: share of long ones")
    p.add_argument("--long-len", type=int, default=1536, help="mixed: long prompt tokens")
    p.add_argument("--short-len", type=int, default=100, help="mixed: short prompt tokens")
    p.add_argument("--system-len", type=int, default=1000, help="chat: system prompt words")
    p.add_argument("--user-len", type=int, default=50, help="chat: words per user turn")
    p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--num-requests", type=int, default=32, help="per load point")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rates", help="open loop: requests/s, comma-separated ('inf' ok; "
                      "default 1)")  # fmt: skip
    load.add_argument("--concurrency", help="closed loop: requests in flight, comma-separated")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--slo", help="goodput targets, e.g. ttft_ms=2000,tpot_ms=200")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="short requests before each target")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--num-cpus", type=int, help="Ray CPUs of a started server (default: the "
                   "topology's total)")  # fmt: skip
    p.add_argument("--out", default="tandem-bench.json", help="results JSON")
    p.add_argument("--plot", help="PNG path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--title", help="the plot's title")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to load {url}: only loopback addresses (127.0.0.0/8, ::1)")


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.concurrency:
        try:
            levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        except ValueError:
            message = f"--concurrency: expected integers, got {args.concurrency!r}"
            raise ValueError(message) from None
        return [LoadPoint(concurrency=c) for c in levels]
    rates = parse_rates(args.rates or "1")
    return [LoadPoint(rate=r, burstiness=args.burstiness) for r in rates]


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        kind=args.workload, input_len=args.input_len, output_len=args.output_len,
        range_ratio=args.range_ratio, long_fraction=args.long_fraction, long_len=args.long_len,
        short_len=args.short_len, system_len=args.system_len, user_len=args.user_len,
        turns=args.turns,
    )  # fmt: skip


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "platform": platform.platform()}


async def first_model(url: str, headers: dict[str, str]) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(f"{url}/v1/models", headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {url}/v1/models: HTTP {response.status}")
            return (await response.json())["data"][0]["id"]


async def warm_up(url: str, model: str, headers: dict[str, str], num: int, timeout_s: float):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(
            send_request(session, url, "completions", model, spec, headers, start)
            for spec in warmup_requests(num)))  # fmt: skip
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"warm-up requests to {url} failed: {failed[0]}")


def format_run(target: str, load: LoadPoint, m: dict) -> str:
    def q(key: str) -> str:
        d = m[key]
        return "-" if d["median"] is None else f"{d['median']:.0f}/{d['p90']:.0f}/{d['p99']:.0f}"

    goodput = "-" if m["request_goodput"] is None else f"{m['request_goodput']:.3f}"
    return (f"{target} | {load.label} | {m['completed']} ok, {m['failed']} failed in "
            f"{m['duration_s']:.1f} s | req/s {m['request_throughput']:.3f}, goodput {goodput} | "
            f"out tok/s {m['output_throughput']:.1f} | ms p50/p90/p99: TTFT {q('ttft_ms')}, "
            f"TPOT {q('tpot_ms')}, ITL {q('itl_ms')}, E2E {q('e2e_ms')}")  # fmt: skip


async def bench_target(url: str, target: str, args, workloads, loads, slo, results, out) -> None:
    check_loopback(url)
    headers = auth_headers(args.api_key)
    model = args.model or await first_model(url, headers)
    if args.warmup:
        await warm_up(url, model, headers, args.warmup, args.request_timeout)
    endpoint = "chat/completions" if args.workload == "chat" else "completions"
    for load, requests in zip(loads, workloads, strict=True):
        load_before = os.getloadavg()
        counters_before = await server_counters(url, headers)
        samples, duration = await run_load(
            url, endpoint, model, requests, load, headers, timeout_s=args.request_timeout,
            seed=args.seed, progress=not args.no_progress, desc=f"{_short(target)} {load.label}",
        )  # fmt: skip
        metrics = summarize(samples, duration, slo)
        counters = await server_counters(url, headers)
        grown = {k: v - counters_before.get(k, 0.0) for k, v in counters.items()
                 if v != counters_before.get(k, 0.0)}  # fmt: skip
        print(format_run(target, load, metrics), flush=True)
        results["runs"].append({"target": target, "url": url, "model": model,
                                "load": load.to_json(), "metrics": metrics,
                                "server_counters": grown,
                                "loadavg_1m": [load_before[0], os.getloadavg()[0]],
                                "requests": [s.to_json() for s in samples]})  # fmt: skip
        write_json(results, out)


async def server_counters(url: str, headers: dict[str, str]) -> dict[str, float]:
    """A Tandem server's ``tandem_*_total`` counters (``name{labels}`` -> value) from /metrics,
    read before and after each run so a run reports what grew (prefix hits, retries, local
    prefills ...); {} for a server without them."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{url}/metrics", headers=headers) as response:
                text = await response.text() if response.status == 200 else ""
    except (aiohttp.ClientError, TimeoutError):
        return {}
    counters = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("tandem_") and name.split("{")[0].endswith("_total"):
            counters[name] = float(value)
    return counters


def _short(target: str) -> str:
    return urlparse(target).netloc if "://" in target else Path(target).stem


def write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    try:
        slo = Slo.parse(args.slo) if args.slo else None
        spec = workload_spec(args)
        loads = load_points(args)
        if not 1 <= args.num_requests <= MAX_REQUESTS:
            raise ValueError(f"--num-requests must be in [1, {MAX_REQUESTS}]")
        configs = args.compare or ([args.config] if args.config else [])
        cpus = {c: config_cpus(c) for c in configs}
        if len(set(cpus.values())) > 1:
            listed = ", ".join(f"{c}: {n:g}" for c, n in cpus.items())
            raise ValueError(f"--compare needs topologies with equal total CPUs, got {listed}")
        if args.url:
            check_loopback(args.url)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"tandem bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workloads = [build_requests(spec, args.num_requests, args.seed + i) for i in range(len(loads))]
    results = {
        "title": args.title or f"tandem bench: {spec.kind} workload, {args.num_requests} requests",
        "command": ["tandem", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "workload": {**vars(spec), "num_requests": args.num_requests, "seed": args.seed},
        "slo": None if slo is None else {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "targets": [{"target": c, "total_cpus": n} for c, n in cpus.items()]
        or [{"target": args.url, "total_cpus": None}],
        "runs": [],
    }
    bench = (workloads, loads, slo, results, out)
    try:
        if args.url:
            asyncio.run(bench_target(args.url, args.url, args, *bench))
        for config in configs:
            log_path = out.with_name(f"{out.stem}.{Path(config).stem}.server.log")
            print(f"starting tandem serve --config {config} (log: {log_path})", flush=True)
            with TandemServer(config, log_path, args.num_cpus) as server:
                url = server.wait_ready()
                asyncio.run(bench_target(url, config, args, *bench))
    except (RuntimeError, aiohttp.ClientError, OSError) as exc:  # no server, failed warm-up
        write_json(results, out)
        print(f"tandem bench: {exc} (runs so far: {out})", file=sys.stderr)
        return 1
    write_json(results, out)
    print(f"results: {out}")
    if not args.no_plot:
        from bench.plot import plot_results

        plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
        plot_results(results, plot_path)
        print(f"plot: {plot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
