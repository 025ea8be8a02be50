"""The PNG of a ``tandem bench`` run: latency percentiles and goodput against the load, one line
per target. matplotlib is imported here only (it costs ~1 s), with the Agg backend: no display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

PANELS = (  # (metric key, title)
    ("ttft_ms", "TTFT (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("itl_ms", "ITL (ms)"),
)


def load_label(load: dict) -> str:
    if load["concurrency"] is not None:
        return str(load["concurrency"])
    return str(load["rate"]) if load["rate"] == "inf" else f"{load['rate']:g}"


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    targets = list(dict.fromkeys(run["target"] for run in runs))
    loads = list(dict.fromkeys(load_label(run["load"]) for run in runs))
    closed = runs[0]["load"]["concurrency"] is not None
    xlabel = "concurrency (closed loop)" if closed else "request rate (req/s)"
    x_of = {label: i for i, label in enumerate(loads)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for t, target in enumerate(targets):
        mine = [run for run in runs if run["target"] == target]
        xs = [x_of[load_label(run["load"])] for run in mine]
        color = colors[t % len(colors)]
        for ax, (key, title) in zip(axes.flat, PANELS, strict=False):
            for q, style in (("median", "-"), ("p99", "--")):
                ys = [run["metrics"][key][q] for run in mine]
                ax.plot(xs, _nan(ys), style, marker="o", color=color, label=f"{target} {q}")
            ax.set_title(title)
            ax.set_yscale("log")
        ax = axes.flat[3]
        ys = [run["metrics"]["request_goodput"] for run in mine]
        ax.plot(xs, _nan(ys), "-", marker="o", color=color, label=f"{target} goodput")
        ys = [run["metrics"]["request_throughput"] for run in mine]
        ax.plot(xs, ys, ":", marker=".", color=color, label=f"{target} throughput")
    slo = results.get("slo")
    goodput_title = "goodput (req/s)"
    if slo:
        targets_ms = [f"{k[:-3].upper()} <= {v:g} ms" for k, v in slo.items() if v is not None]
        goodput_title += ": " + ", ".join(targets_ms)
    axes.flat[3].set_title(goodput_title)
    axes.flat[3].set_ylim(bottom=0)
    for ax in axes.flat:
        ax.set_xticks(range(len(loads)), loads)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(results.get("title", "tandem bench"), 120), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]
