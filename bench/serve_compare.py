"""Serving comparison in one run: the same closed-loop streaming load against Tandem topologies
(started here), llama.cpp's ``llama-server`` (started here) and any OpenAI-compatible URL.

    flock /tmp/tandem-heavy.lock python -m bench.serve_compare \\
        --tandem configs/colocated-int4.yaml --tandem configs/local.yaml \\
        --llama-server "$(../shared/tools/build-llama-server.sh)" --concurrency 1,16,64

Load (the same for every server, one server at a time): C clients, each sending its next request
as soon as its last one finished (closed loop), ``--rounds`` requests per client (at least
``--min-requests`` in all). Prompts: the 32 chat prompts of ``bench/chat_prompts.py``,
chat-templated by our tokenizer and sent as token ids to ``/v1/completions`` (so every server sees
the same prompt tokens), ``max_tokens`` = ``--output-len`` (128), ``ignore_eos``, greedy,
``stream: true``. ``--prompt-tokens N``: long-context prompts of about N tokens instead (each chat
prompt, a document of the other prompts' text starting at a different one for each, so no two
share a cached prefix, then the prompt again). Measured per server and C, as vLLM's ``bench
serve`` does:

    tok/s   generated tokens (the streamed usage, else one per chunk) / wall time of the run
    TTFT    first streamed token - request sent (p50)
    ITL     gap between consecutive streamed chunks after the first (p50; the JSON lines also
            give its p99 and mean)

Tandem servers are ``tandem serve --config X --port 0 --num-cpus N``; ``llama-server`` runs on the
builtin model's GGUF (the same file Tandem loads) with ``-t N`` threads and ``-np`` = the largest
C slots. One warm-up request per server before its first C. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.chat_prompts import CHAT_PROMPTS
from bench.offline_throughput import load_average, machine
from bench.tandem_bench import check_loopback
from coordinator.status_window import percentile
from tests.e2e.server_process import ServerProcess, free_port


@dataclass
class Sample:
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      output_len: int) -> Sample:  # fmt: skip
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sample, start = Sample(), time.perf_counter()
    last, chunks, usage = start, 0, None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return sample
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    sample.error = str(event["error"])[:200]
                    return sample
                usage = event.get("usage") or usage
                if not event.get("choices") or not event["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if sample.ttft is None:
                    sample.ttft = now - start
                else:
                    sample.itls.append(now - last)
                last = now
                chunks += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = repr(exc)
    sample.num_tokens = usage["completion_tokens"] if usage else chunks
    return sample


def percentile_ms(values: list[float], q: float = 50) -> float:
    return 1e3 * percentile(sorted(values), q) if values else 0.0


async def run_load(url: str, model: str, prompts: list[list[int]], concurrency: int,
                   num_requests: int, output_len: int, deadline_s: float | None = None) -> dict:
    """``num_requests`` requests over ``concurrency`` closed-loop clients (no new request after
    ``deadline_s`` seconds, if given)."""
    queue = list(range(num_requests))
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=1800)
    # a new connection per request: llama-server drops idle keep-alive connections, which
    # aiohttp would otherwise reuse and fail on ("Can not write request body")
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client() -> None:
            while queue and (deadline_s is None or time.perf_counter() - start < deadline_s):
                i = queue.pop()
                samples.append(await one_request(session, url, model, prompts[i % len(prompts)],
                                                 output_len))  # fmt: skip

        start = time.perf_counter()  # (read by the clients: set before they run)
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [s for s in samples if s.error is None]
    itls = [x for s in ok for x in s.itls]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "tok_s": sum(s.num_tokens for s in ok) / wall,
        "ttft_p50_ms": percentile_ms([s.ttft for s in ok if s.ttft is not None]),
        "itl_p50_ms": percentile_ms(itls),
        "itl_p99_ms": percentile_ms(itls, 99),  # (in the JSON lines only: the tail the p50 hides)
        "itl_mean_ms": 1e3 * sum(itls) / len(itls) if itls else 0.0,
        "wall_s": wall,
        "first_error": next((s.error for s in samples if s.error), None),
    }


def start_tandem(config: str, num_cpus: int, log: Path) -> ServerProcess:
    args = [sys.executable, "-m", "coordinator.cli", "serve", "--config", config, "--port", "0",
            "--num-cpus", str(num_cpus)]  # fmt: skip
    return ServerProcess(args, log)


def start_llama(binary: str, gguf: str, threads: int, slots: int, ctx_per_slot: int,
                log: Path) -> ServerProcess:  # fmt: skip
    port = free_port()
    args = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
            "--no-webui"]  # fmt: skip
    proc = ServerProcess(args, log)
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def wait_http(url: str, timeout_s: float = 300) -> None:
    """llama-server prints no URL line we parse: poll /health until it answers 200."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def chat_prompt_ids(prompt_tokens: int = 0) -> tuple[list[list[int]], str]:
    """The chat prompts as token ids (and the builtin GGUF's path). ``prompt_tokens`` > 0: each
    becomes a long-context one of about that many tokens: the prompt, a document (the other
    prompts' text, repeated, starting at a different one for each, so that no two prompts share a
    cached prefix), then the prompt again as the question."""
    from core.tokenizer import Tokenizer
    from engine.loader.builtin import builtin_gguf_path
    from engine.tokenizer_files import load_tokenizer_files

    tok = Tokenizer(load_tokenizer_files("builtin:smollm2-135m-instruct"))
    texts = list(CHAT_PROMPTS)
    if prompt_tokens > 0:
        texts = [_long_prompt(tok, i, prompt_tokens) for i in range(len(CHAT_PROMPTS))]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in texts]
    return ids, str(builtin_gguf_path("smollm2-135m-instruct"))


def _long_prompt(tok, i: int, num_tokens: int) -> str:
    n = len(CHAT_PROMPTS)
    doc: list[str] = []
    j = i + 1
    head, tail = f"{CHAT_PROMPTS[i]}\n\nContext:\n", f"\n\nWith that context: {CHAT_PROMPTS[i]}"
    while len(tok.encode(head + " ".join(doc) + tail)) < num_tokens:
        doc.append(CHAT_PROMPTS[j % n])
        j += 1
    return head + " ".join(doc[:-1] if len(doc) > 1 else doc) + tail


def bench_server(name: str, url: str, model: str, prompts, levels, args) -> list[dict]:
    check_loopback(url)
    asyncio.run(run_load(url, model, prompts, 1, 1, 8))  # warm-up
    rows = []
    for c in levels:
        n = max(args.min_requests, c * args.rounds)
        r = asyncio.run(run_load(url, model, prompts, c, n, args.output_len))
        r["server"] = name
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_compare", description=__doc__)
    ap.add_argument("--tandem", action="append", default=[], help="a topology YAML to serve")
    ap.add_argument("--llama-server", help="llama-server binary (build-llama-server.sh)")
    ap.add_argument("--url", action="append", default=[], help="NAME=URL of a running server")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="long-context prompts of about this many tokens (0: the chat prompts)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                    help="CPUs for each Tandem server / llama-server threads")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts, gguf = chat_prompt_ids(args.prompt_tokens)
    print(f"machine: {machine()}; load avg {load_average()}", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="serve_compare-"))
    rows: list[dict] = []
    servers = [("tandem " + Path(c).stem, c) for c in args.tandem]
    if args.llama_server:
        servers.append(("llama.cpp", None))
    for name, config in servers:
        log = logs / f"{name.replace(' ', '_')}.log"
        if config is not None:
            proc = start_tandem(config, args.num_cpus, log)
            url = proc.wait_ready(600)
        else:
            ctx = max(len(p) for p in prompts) + args.output_len + 16
            proc = start_llama(args.llama_server, gguf, args.num_cpus, max(levels), ctx, log)
            url = proc.url
            wait_http(url)
        try:
            rows += bench_server(name, url, args.model, prompts, levels, args)
        finally:
            code, left = proc.stop()
            if left:
                print(f"warning: {name} left processes {left}", file=sys.stderr)
    for spec in args.url:
        name, url = spec.split("=", 1)
        rows += bench_server(name, url, args.model, prompts, levels, args)
    print(f"\nload avg after: {load_average()}; server logs in {logs}")
    print_table(rows, levels)
    return 0


def print_table(rows: list[dict], levels: list[int]) -> None:
    header = " | ".join(f"{c} streams: tok/s, ITL p50, TTFT p50" for c in levels)
    print(f"| server | {header} |")
    print("|---|" + "---|" * len(levels))
    for name in dict.fromkeys(r["server"] for r in rows):
        cells = []
        for c in levels:
            r = next((r for r in rows if r["server"] == name and r["concurrency"] == c), None)
            if r is None:
                cells.append("-")
                continue
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            cells.append(f"{r['tok_s']:.0f}, {r['itl_p50_ms']:.1f} ms, "
                         f"{r['ttft_p50_ms'] / 1e3:.2f} s{err}")  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
