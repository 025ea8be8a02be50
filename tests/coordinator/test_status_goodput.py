"""Goodput in the server (coordinator.slo -> tandem_goodput_requests_total), the config keys
that set it, and the last-minute windows behind the status page."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from engine_double import ScriptedEngine
from serving_harness import MODEL, make_config, running_server
from tokenizer_double import ByteTokenizer

from coordinator.metrics import meets_slo
from coordinator.status_window import CounterRate, EventWindow, LatencyWindow, percentile
from core.config import ConfigError, SloSection

TOK = ByteTokenizer()


def _serve_and_count(slo: dict | None, engine: ScriptedEngine, num: int = 3) -> tuple[str, str]:
    config = make_config(**({"slo": slo} if slo else {}))

    async def main():
        async with running_server(config, engine, TOK) as url:
            async with aiohttp.ClientSession() as s:
                body = {"model": MODEL, "prompt": "ab", "max_tokens": 4}
                for r in await asyncio.gather(
                    *(s.post(f"{url}/v1/completions", json=body) for _ in range(num))
                ):
                    await r.read()
                async with s.get(f"{url}/metrics") as r:
                    return await r.text()

    text = asyncio.run(main())
    lines = text.splitlines()
    good = next(line for line in lines if line.startswith("tandem_goodput_requests_total"))
    done = [line for line in lines if line.startswith("tandem_requests_total")]
    return good.split()[-1], " ".join(done)


@pytest.mark.parametrize(
    ("slo", "expected"),
    [
        (None, "3.0"),  # no SLO: every finished request
        ({"ttft_ms": 5000, "tpot_ms": 5000}, "3.0"),
        ({"ttft_ms": 10}, "0.0"),  # the double sleeps 20 ms before each token
        ({"tpot_ms": 5}, "0.0"),
        ({"ttft_ms": 5000}, "3.0"),
    ],
)
def test_goodput_counts_exactly_the_requests_within_the_slo(slo, expected):
    good, done = _serve_and_count(slo, ScriptedEngine(token_delay_s=0.02))
    assert good == expected
    assert 'outcome="length"} 3.0' in done


def test_failed_requests_are_not_goodput():
    good, done = _serve_and_count(None, ScriptedEngine(fail_after=2))
    assert good == "0.0" and 'outcome="error"} 3.0' in done


def test_meets_slo_is_inclusive_and_checks_only_set_targets():
    slo = SloSection(ttft_ms=250, tpot_ms=50)
    assert meets_slo(slo, 0.25, 0.05) and meets_slo(None, None, 9.0)
    assert not meets_slo(slo, 0.2501, 0.01) and not meets_slo(slo, 0.1, 0.0501)
    assert not meets_slo(slo, None, 0.0)  # no token at all: no TTFT to meet
    assert meets_slo(SloSection(tpot_ms=50), None, 0.0)


@pytest.mark.parametrize(
    ("slo", "problem"),
    [
        ({}, "coordinator.slo: set at least one of ttft_ms, tpot_ms"),
        ({"ttft_ms": -1}, "coordinator.slo.ttft_ms: Input should be greater than 0"),
        ({"ttft_ms": "500"}, "coordinator.slo.ttft_ms: Input should be a valid number"),
        ({"ttft": 5}, "coordinator.slo.ttft: unknown key (allowed: ttft_ms, tpot_ms)"),
    ],
)
def test_slo_config_errors_name_the_key(slo, problem):
    with pytest.raises(ConfigError) as info:
        make_config(slo=slo)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_slo_config_accepts_ints_and_one_target():
    assert make_config(slo={"tpot_ms": 40}).coordinator.slo == SloSection(tpot_ms=40.0)
    assert make_config().coordinator.slo is None


def test_latency_window_percentiles_match_numpy_and_forget_old_samples():
    rng = np.random.default_rng(0)
    values = rng.exponential(0.1, size=501).tolist()
    window = LatencyWindow(window_s=60.0)
    window.add(0.0, 99.0)  # leaves the window before the read at t=100
    for i, v in enumerate(values):
        window.add(50.0 + i * 0.01, v)
    got = window.summary(100.0)
    assert got["count"] == 501
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(1000 * np.percentile(values, q), rel=1e-12)
    assert window.summary(200.0) == {"count": 0, "p50": None, "p90": None, "p99": None}
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_event_window_rate_and_counter_rate():
    events = EventWindow(started=0.0, window_s=60.0)
    for t in (1.0, 2.0, 3.0):
        events.add(t)
    assert events.rate(3.0) == 1.0  # 3 events over the 3 s since start
    events.add(62.5)
    assert events.count(62.5) == 2 and events.rate(62.5) == pytest.approx(2 / 60)  # 3.0, 62.5
    assert EventWindow(started=0.0).rate(0.001) == 0.0
    rate = CounterRate(span_s=10.0)
    assert rate.rate(0.0, 0) is None
    assert rate.rate(2.0, 1000) == 500.0
    assert rate.rate(20.0, 1000) == 0.0  # the old readings left the 10 s span
    assert rate.rate(21.0, 500) is None  # the counter went down: start over
