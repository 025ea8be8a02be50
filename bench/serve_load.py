"""Serving benchmark: a bounded open-loop load generator against a Tandem server on this host.

    python -m bench.serve_load --config configs/local.yaml --rates 0.5,1,2 --num-requests 24
    python -m bench.serve_load --url http://127.0.0.1:8000 --rates 1

With ``--config`` it starts ``tandem serve`` itself (port 0), runs every rate, and stops it.
Requests arrive as a Poisson process at each rate (``inf``: all at once); every prompt is
``--input-len`` random token ids and every output exactly ``--output-len`` tokens (ignore_eos),
so runs are comparable. Measured per rate, as vLLM's ``bench serve`` does:

    TTFT  first streamed token - request sent          ITL  gap between later tokens
    output tokens/s = all generated tokens / wall time of the rate's run

Only loopback addresses are accepted, and every run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp

MAX_REQUESTS = 512
URL_LINE = re.compile(r"Tandem: serving \S+ at (http://\S+)")


@dataclass
class Sample:
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing to load {url}: only loopback addresses (127.0.0.0/8, ::1)")


async def one_request(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], output_len: int
) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    sample, start = Sample(), time.perf_counter()
    last = start
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}"
                return sample
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    sample.error = event["error"]["message"]
                    return sample
                now = time.perf_counter()
                if sample.ttft is None:
                    sample.ttft = now - start
                else:
                    sample.itls.append(now - last)
                last = now
                sample.num_tokens += 1  # one token per streamed chunk (no speculation)
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = repr(exc)
    return sample


async def run_rate(url: str, model: str, rate: float, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.input_len)]
               for _ in range(args.num_requests)]  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(
                one_request(session, url, model, prompt, args.output_len)))  # fmt: skip
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [s for s in samples if s.error is None]
    ttfts = sorted(s.ttft for s in ok if s.ttft is not None)
    itls = sorted(x for s in ok for x in s.itls)
    return {
        "rate": rate,
        "num_requests": len(samples),
        "num_errors": len(samples) - len(ok),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(itls, 50),
        "itl_p99_ms": 1000 * percentile(itls, 99),
        "output_tok_s": sum(s.num_tokens for s in ok) / wall,
        "wall_s": wall,
        "errors": sorted({s.error for s in samples if s.error})[:3],
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def start_server(config: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "serve", "--config", config, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        if (m := URL_LINE.search(line)) is not None:
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server for {config} did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="start `tandem serve --config CONFIG` for the run")
    where.add_argument("--url", help="a running server on this host")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rates", default="1", help="requests/s, comma-separated ('inf' ok)")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.num_requests <= MAX_REQUESTS:
        raise SystemExit(f"--num-requests must be in [1, {MAX_REQUESTS}]")
    rates = [float(r) for r in args.rates.split(",")]
    proc, url = start_server(args.config) if args.config else (None, args.url)
    check_loopback(url)
    # keep the server's output flowing (a full pipe would block its logging)
    drain = None
    if proc is not None:
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    try:
        asyncio.run(run_rate(url, args.model, float("inf"), argparse.Namespace(
            **{**vars(args), "num_requests": 2, "output_len": 4})))  # warm-up  # fmt: skip
        for rate in rates:
            result = asyncio.run(run_rate(url, args.model, rate, args))
            result["config"] = args.config or url
            print(json.dumps(result), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if drain is not None:
                drain.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
