"""tandem bench's pure parts: metrics from known timestamps equal hand-computed values, goodput
counts exactly the requests within the SLO, arrivals and workloads are what they claim."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys

import numpy as np
import pytest

from bench.arrivals import LoadPoint, arrival_times, parse_rates
from bench.serving_metrics import RequestResult, Slo, summarize
from bench.workloads import TOKEN_ID_RANGE, WorkloadSpec, build_requests

A = RequestResult(0.0, ttft_s=0.1, itls_s=(0.02, 0.04), latency_s=0.16, prompt_tokens=10,
                  output_tokens=3)  # TPOT (0.16 - 0.1) / 2 = 30 ms  # fmt: skip
B = RequestResult(0.5, ttft_s=0.3, itls_s=(0.05,), latency_s=0.35, prompt_tokens=20,
                  output_tokens=2)  # TPOT 50 ms  # fmt: skip
C = RequestResult(0.9, ttft_s=0.2, latency_s=0.2, prompt_tokens=30, output_tokens=1)  # TPOT 0
D = RequestResult(1.0, error="HTTP 500: boom")


def test_summary_equals_hand_computed_values():
    m = summarize([A, B, C, D], 2.0, Slo(ttft_ms=250, tpot_ms=40))
    assert (m["completed"], m["failed"], m["errors"]) == (3, 1, ["HTTP 500: boom"])
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 6)
    assert m["request_throughput"] == 1.5
    assert m["output_throughput"] == 3.0
    assert m["total_token_throughput"] == 33.0
    # A (100 ms, 30 ms) and C (200 ms, one token: TPOT 0) meet it; B's TTFT 300 ms does not
    assert (m["good_requests"], m["request_goodput"]) == (2, 1.0)
    approx = pytest.approx
    # TTFT [100, 300, 200]: p90 at rank 1.8 of [100, 200, 300] = 200 + 0.8 * 100
    assert m["ttft_ms"] == approx({"mean": 200, "median": 200, "p90": 280, "p99": 298})
    assert m["tpot_ms"] == approx({"mean": 40, "median": 40, "p90": 48, "p99": 49.8})  # [30, 50]
    assert m["itl_ms"] == approx({"mean": 110 / 3, "median": 40, "p90": 48, "p99": 49.8})
    assert m["e2e_ms"] == approx({"mean": 710 / 3, "median": 200, "p90": 320, "p99": 347})


def test_goodput_targets_are_inclusive_and_optional():
    edge = RequestResult(0.0, ttft_s=0.25, itls_s=(0.5,), latency_s=0.75, output_tokens=2)
    assert Slo(ttft_ms=250, tpot_ms=500).met_by(edge)
    assert not Slo(ttft_ms=249.9).met_by(edge)
    assert not Slo(tpot_ms=499.9).met_by(edge)
    assert Slo(ttft_ms=250).met_by(edge)  # TPOT not checked
    m = summarize([A, B, C], 1.0, None)
    assert (m["good_requests"], m["request_goodput"]) == (None, None)
    assert m["tpot_ms"]["median"] == pytest.approx(40)


def test_no_completed_request_gives_empty_distributions():
    m = summarize([D], 1.0, Slo(ttft_ms=1))
    assert m["completed"] == 0 and m["ttft_ms"]["p99"] is None and m["request_goodput"] == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ttft_ms=500,tpot_ms=50", Slo(500, 50)), ("tpot_ms=20", Slo(None, 20))],
)
def test_slo_parse(text, expected):
    assert Slo.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "at least one"), ("ttft=5", "expected ttft_ms"), ("ttft_ms=x", "must be a number"),
     ("tpot_ms=0", "must be > 0")],
)  # fmt: skip
def test_slo_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Slo.parse(text)


def test_arrivals_keep_the_offered_rate_exact():
    times = arrival_times(100, 2.0, 1.0, seed=3)
    assert times[-1] == pytest.approx(50.0) and times == sorted(times) and times[0] > 0
    assert arrival_times(5, math.inf, 1.0, seed=0) == [0.0] * 5
    assert arrival_times(10, 1.0, 1.0, seed=7) == arrival_times(10, 1.0, 1.0, seed=7)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_the_burstiness_spread(burstiness):
    """Gamma with shape k has coefficient of variation 1 / sqrt(k): burstier below 1."""
    gaps = np.diff([0.0, *arrival_times(20000, 5.0, burstiness, seed=1)])
    assert gaps.mean() == pytest.approx(0.2, rel=1e-6)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_load_points_and_rates_are_checked():
    assert parse_rates("0.5, 1,inf") == [0.5, 1.0, math.inf]
    assert LoadPoint(rate=math.inf).to_json()["rate"] == "inf"
    assert LoadPoint(concurrency=4).label == "concurrency 4"
    for bad in ({"rate": 0.0}, {"concurrency": 0}, {}, {"rate": 1.0, "concurrency": 2},
                {"rate": 1.0, "burstiness": 0.0}):  # fmt: skip
        with pytest.raises(ValueError):
            LoadPoint(**bad)
    with pytest.raises(ValueError, match="--rates"):
        parse_rates("1,fast")


def test_fixed_and_dist_workloads():
    fixed = build_requests(WorkloadSpec("fixed", input_len=7, output_len=3), 4, seed=0)
    assert [(len(r.payload["prompt"]), r.output_len) for r in fixed] == [(7, 3)] * 4
    low, high = TOKEN_ID_RANGE
    assert all(low <= t < high for r in fixed for t in r.payload["prompt"])
    dist = build_requests(WorkloadSpec("dist", input_len=100, output_len=20), 200, seed=1)
    assert {len(r.payload["prompt"]) for r in dist} <= set(range(50, 151))
    assert {r.output_len for r in dist} <= set(range(10, 31))
    assert len({len(r.payload["prompt"]) for r in dist}) > 20  # actually drawn, not constant
    again = build_requests(WorkloadSpec("dist", input_len=100, output_len=20), 200, seed=1)
    assert again == dist


def test_mixed_workload_has_the_exact_share_of_long_prompts():
    spec = WorkloadSpec("mixed", long_fraction=0.2, long_len=150, short_len=10, output_len=5)
    lengths = [len(r.payload["prompt"]) for r in build_requests(spec, 10, seed=0)]
    assert sorted(lengths) == [10] * 8 + [150] * 2
    assert lengths != sorted(lengths)  # shuffled (this seed)


def test_chat_workload_shares_the_system_prompt_and_grows_conversations():
    spec = WorkloadSpec("chat", system_len=30, user_len=5, output_len=4, turns=3)
    requests = build_requests(spec, 7, seed=0)  # 3 conversations: turns 1, 1, 1, 2, 2, 2, 3
    assert spec.endpoint == "chat/completions" and len(requests) == 7
    messages = [r.payload["messages"] for r in requests]
    assert len({m[0]["content"] for m in messages}) == 1  # one system prompt for all
    assert len(messages[0][0]["content"].split()) == 30
    assert [len(m) for m in messages] == [2, 2, 2, 4, 4, 4, 6]
    assert messages[3][:2] == messages[0]  # conversation 0, turn 2 extends turn 1
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["role"] for m in messages[6]] == roles
    assert requests[3].input_len == 30 + 5 + 4 + 5
    assert statistics.mean(len(m[-1]["content"].split()) for m in messages) == 5


def test_workload_values_are_checked():
    for bad in ({"kind": "poisson"}, {"input_len": 0}, {"range_ratio": 1.0},
                {"long_fraction": 1.5}, {"turns": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            WorkloadSpec(**bad)


def test_tandem_bench_loads_neither_torch_nor_matplotlib():
    """matplotlib only when plotting; torch never (bench runs beside a server, not a model)."""
    code = ("import sys, coordinator.cli, bench.tandem_bench; "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
