"""Where a served token's time goes: py-spy on the coordinator and the worker while closed-loop
clients (one by default) stream requests back to back.

    flock /tmp/tandem-heavy.lock python -m bench.serve_profile --config configs/colocated-int4.yaml
    python -m bench.serve_profile --config configs/colocated-int4.yaml --concurrency 64

Starts ``tandem serve`` (port 0), runs ``--concurrency`` closed-loop streams (chat prompts, 128
tokens, ignore_eos, greedy) for ``--seconds``, and meanwhile samples both processes with ``py-spy
record --format raw --idle`` (wall clock: idle and waiting samples included, so the shares add up to
the elapsed time of each thread). Prints the ITL p50 of the run, and for each process the share
of samples whose stack contains each of a few marker functions (first match wins, in the order
listed), per thread. py-spy comes with the ``profile`` extra (``pip install -e .[profile]``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.serve_compare import chat_prompt_ids, run_load, start_tandem

# (label, substring of a frame) in priority order: the first that occurs in a stack names it
WORKER_MARKERS = [
    ("model forward", "engine/model.py"),
    ("sampler", "engine/sampler.py"),
    ("step inputs", "engine/step_inputs.py"),
    ("scheduler", "engine/scheduler.py"),
    ("postprocess / detok", "engine_core.py:postprocess"),
    ("emit (ZMQ send)", "emit (engine/worker_base.py"),
    ("idle wait", "_loop (engine/worker_base.py"),
    ("ray / rpc threads", "ray"),
]
COORD_MARKERS = [
    ("token stream read", "token_stream.py"),
    ("output assembly / detok", "output_assembler.py"),
    ("detokenizer", "detokenizer.py"),
    ("response / SSE write", "response_writer.py"),
    ("aiohttp", "aiohttp"),
    ("asyncio loop (select)", "select"),
    ("ray", "ray"),
]


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--format",
            "raw", "--idle", "--threads", "--nonblocking", "-o", str(out)]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def breakdown(raw: Path, markers: list[tuple[str, str]]) -> dict[str, collections.Counter]:
    """thread name -> label -> samples, from py-spy's raw (collapsed stacks) output."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        thread = stack.split(";", 2)[1] if stack.startswith("process") else stack.split(";", 1)[0]
        label = next((name for name, key in markers if key in stack), "other")
        threads[thread][label] += int(count)
    return threads


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_profile", description=__doc__)
    ap.add_argument("--config", default="configs/colocated-int4.yaml")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()
    prompts, _ = chat_prompt_ids()
    logs = Path(tempfile.mkdtemp(prefix="serve_profile-"))
    proc = start_tandem(args.config, args.num_cpus, logs / "server.log")
    try:
        url = proc.wait_ready(600)
        asyncio.run(run_load(url, "smollm2-135m-instruct", prompts, 1, 2, 16))  # warm-up
        worker_pid = next(iter(proc.worker_pids.values()))
        result: dict = {}
        load_args = (url, "smollm2-135m-instruct", prompts, args.concurrency, 100_000, 128)
        run = lambda: result.update(asyncio.run(run_load(*load_args, deadline_s=args.seconds + 4)))  # noqa: E731
        load = threading.Thread(target=run)
        load.start()
        spies = [(name, record(pid, args.seconds, logs / f"{name}.txt"), markers)
                 for name, pid, markers in (("coordinator", proc.proc.pid, COORD_MARKERS),
                                            ("worker", worker_pid, WORKER_MARKERS))]  # fmt: skip
        for _, spy, _ in spies:
            spy.wait()
        load.join()
    finally:
        proc.stop()
    print(f"{args.concurrency} stream(s): {result.get('requests')} requests, "
          f"{result.get('tok_s', 0):.1f} tok/s, "
          f"ITL p50 {result.get('itl_p50_ms', 0):.2f} ms, TTFT p50 "
          f"{result.get('ttft_p50_ms', 0):.1f} ms; raw stacks in {logs}")  # fmt: skip
    for name, _, markers in spies:
        for thread, counts in breakdown(logs / f"{name}.txt", markers).items():
            total = sum(counts.values())
            if total < 50:
                continue
            parts = ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in counts.most_common())
            print(f"{name} {thread} ({total} samples): {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
