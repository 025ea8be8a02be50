"""``tandem scale``: change a running server's pool size (live scaling), and wait for it.

    tandem scale --url http://127.0.0.1:8000 --pool decode --replicas 3 [--api-key KEY]
                 [--wait SECONDS]

POSTs ``/admin/pools/{pool}/replicas`` and, with ``--wait`` (default 300 s; 0: do not wait),
polls ``/health`` until the pool has exactly that many live workers. Exit 0 when it does, 1 on
a refusal or a timeout, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

POLL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--pool", required=True, help="prefill, decode or colocated")
    parser.add_argument("--replicas", type=int, required=True, help="the pool's new size (>= 1)")
    parser.add_argument("--api-key", help="the server's API key (default: $TANDEM_API_KEY)")
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for the pool to reach it (0: do not wait)")


def _request(url: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def run(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        print("tandem scale: --replicas must be >= 1", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    key = args.api_key or os.environ.get("TANDEM_API_KEY")
    try:
        status, body = _request(f"{base}/admin/pools/{args.pool}/replicas", key,
                                {"replicas": args.replicas})  # fmt: skip
    except (urllib.error.URLError, OSError) as exc:
        print(f"tandem scale: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if status != 202:
        message = body.get("error", {}).get("message", body)
        print(f"tandem scale: refused ({status}): {message}", file=sys.stderr)
        return 1
    print(f"{args.pool}: target {body['target']}, live {body['live']}", flush=True)
    deadline = time.monotonic() + args.wait
    while args.wait > 0:
        _, health = _request(f"{base}/health", None)
        pool = health.get("pools", {}).get(args.pool, {})
        if pool.get("live") == args.replicas == pool.get("target"):
            print(f"{args.pool}: {args.replicas} live", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"tandem scale: {args.pool} still at {pool.get('live')} live after "
                  f"{args.wait:.0f} s", file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(POLL_S)
    return 0
