"""Routing and conditional disaggregation, measured with ``tandem bench --compare`` on topology
variants that differ only in the setting under test (same CPUs, same workload, one run).

    python -m bench.replicas routing [--out DIR]   # configs/local-2p2d.yaml: kv_aware vs
                                                   # least_loaded, multi-turn chat sharing a
                                                   # ~1k-token system prompt
    python -m bench.replicas local [--out DIR]     # short prompts: configs/local.yaml with
                                                   # local prefill (conditional), always remote,
                                                   # and configs/colocated.yaml

Each prints tandem bench's lines and, from the servers' counters, the share of prompt tokens
found in the prefill / decode pools' prefix caches and where prompts were prefilled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from bench import tandem_bench

ROOT = Path(__file__).resolve().parents[1]


def variant(base: str, out: Path, name: str, **coordinator: object) -> str:
    config = yaml.safe_load((ROOT / base).read_text())
    config["coordinator"].update(coordinator)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def share(counters: dict[str, float], name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return counters.get(f"{name}{{{wanted}}}" if wanted else name, 0.0)


def report(results_path: Path) -> None:
    results = json.loads(results_path.read_text())
    for run in results["runs"]:
        c = run["server_counters"]
        prompt = sum(r["prompt_tokens"] for r in run["requests"])
        hits = {pool: share(c, "tandem_prefix_hit_tokens_total", pool=pool) / max(prompt, 1)
                for pool in ("prefill", "decode", "colocated")}  # fmt: skip
        where = {k.split("{", 1)[1].rstrip("}"): v for k, v in c.items()
                 if k.startswith("tandem_prefill_location_total")}  # fmt: skip
        m = run["metrics"]
        print(f"{Path(run['target']).stem}: TTFT p50 {m['ttft_ms']['median']:.0f} ms, "
              f"p99 {m['ttft_ms']['p99']:.0f} ms; prefix hits / prompt tokens: "
              + ", ".join(f"{p} {v:.2f}" for p, v in hits.items() if v)
              + (f"; prefill locations {where}" if where else ""), flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("routing", "local"))
    p.add_argument("--out", default="bench-results", help="a directory for configs and results")
    p.add_argument("--num-requests", type=int, default=24)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "routing":
        configs = [variant("configs/local-2p2d.yaml", out, f"2p2d-{policy}", routing=policy)
                   for policy in ("kv_aware", "least_loaded")]  # fmt: skip
        workload = ["--workload", "chat", "--system-len", "800", "--user-len", "30", "--turns",
                    "4", "--output-len", "16", "--concurrency", "4"]  # fmt: skip
    else:
        configs = [
            variant("configs/local.yaml", out, "conditional", local_prefill={"max_tokens": 128}),
            variant("configs/local.yaml", out, "always-remote"),
            str(ROOT / "configs/colocated.yaml"),
        ]
        workload = ["--workload", "fixed", "--input-len", "48", "--output-len", "16",
                    "--rates", "1,2"]  # fmt: skip
    results = out / f"{args.what}.json"
    code = tandem_bench.main(["--compare", *configs, *workload, "--num-requests",
                              str(args.num_requests), "--out", str(results), "--no-progress",
                              "--title", f"bench.replicas {args.what}"])  # fmt: skip
    if code == 0:
        report(results)
    return code


if __name__ == "__main__":
    sys.exit(main())
