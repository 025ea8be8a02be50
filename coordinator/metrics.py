"""Prometheus metrics of one coordinator, in its own registry.

Latencies (TTFT, inter-token) are observed here, where the client's clock is, both into the
histograms and into the last-minute windows of the status page (``coordinator.status_window``);
so is goodput: finished requests that met ``coordinator.slo``. Engine-side load
(KV blocks, running/waiting, transfer totals) is pulled from ``EngineClient.stats()`` on each
scrape and exposed by a custom collector, so the values are never older than the scrape and
cumulative transfer totals stay true counters even though the engine owns them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from coordinator.engine_client import EngineStats, SpecStats
from coordinator.status_window import RecentTraffic
from core.config import SloSection

# Seconds. TTFT spans CPU prefill of long prompts (seconds) down to GPU hits (milliseconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, slo: SloSection | None = None) -> None:
        self.slo = slo
        self.recent = RecentTraffic(time.monotonic())
        self.registry = CollectorRegistry()  # per server: several servers can share a process
        self.requests = Counter(
            "tandem_requests",
            "Generation requests by endpoint and outcome "
            "(stop, length, error, timeout, disconnect, rejected_<status>).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.goodput = Counter(
            "tandem_goodput_requests",
            "Requests that finished (stop or length) within coordinator.slo: TTFT <= ttft_ms and "
            "TPOT <= tpot_ms (every finished request when no SLO is set).",
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "tandem_time_to_first_token_seconds",
            "From request arrival to the first generated token leaving the engine.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "tandem_inter_token_latency_seconds",
            "Time between generated tokens (a delta of k tokens counts k gaps of 1/k each).",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "tandem_request_latency_seconds",
            "From request arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tandem_coordinator_in_flight_requests",
            "Requests admitted by the coordinator and not yet finished.",
            registry=self.registry,
        )
        self._engine = _EngineStatsCollector()
        self.registry.register(self._engine)

    def observe_admitted(self) -> None:
        self.recent.admitted.add(time.monotonic())

    def observe_first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.observe(ttft_s)
        self.recent.ttft.add(time.monotonic(), ttft_s)

    def observe_token_gaps(self, gap_s: float, count: int) -> None:
        for _ in range(count):
            self.inter_token_latency.observe(gap_s)
        self.recent.itl.add(time.monotonic(), gap_s, count)

    def observe_finish(
        self, latency_s: float, ttft_s: float | None, tpot_s: float, completed: bool
    ) -> None:
        """``completed``: ended by stop or length (not an error); ``tpot_s`` as vLLM defines it:
        (last token - first token) / (output tokens - 1), 0 for a single token."""
        self.request_latency.observe(latency_s)
        if not completed:
            return
        now = time.monotonic()
        self.recent.finished.add(now)
        if meets_slo(self.slo, ttft_s, tpot_s):
            self.goodput.inc()
            self.recent.good.add(now)

    def set_engine_stats(self, stats: EngineStats) -> None:
        self._engine.snapshot = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)


def meets_slo(slo: SloSection | None, ttft_s: float | None, tpot_s: float) -> bool:
    """Every set target met (inclusive, as vLLM's goodput); no SLO: met."""
    if slo is None:
        return True
    if slo.ttft_ms is not None and (ttft_s is None or 1000.0 * ttft_s > slo.ttft_ms):
        return False
    return slo.tpot_ms is None or 1000.0 * tpot_s <= slo.tpot_ms


class _EngineStatsCollector:
    def __init__(self) -> None:
        self.snapshot = EngineStats()

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot
        pools, transfers = stats.pools, stats.transfers
        yield from (
            _gauge("tandem_kv_blocks_used", "KV blocks in use.", ["pool"],
                   [(p.name, p.num_kv_blocks_used) for p in pools]),
            _gauge("tandem_kv_blocks_total", "KV blocks in all.", ["pool"],
                   [(p.name, p.num_kv_blocks_total) for p in pools]),
            _counter("tandem_kv_transfer_bytes", "KV cache bytes moved.", ["backend"],
                     [(t.backend, t.num_bytes) for t in transfers]),
            _counter("tandem_kv_transfer_seconds", "Time spent moving KV cache.", ["backend"],
                     [(t.backend, t.seconds) for t in transfers]),
            _gauge("tandem_running_requests", "Requests in a batch.", [], [(stats.num_running,)]),
            _gauge("tandem_waiting_requests", "Requests queued in the engine.", [],
                   [(stats.num_waiting,)]),
        )  # fmt: skip
        yield from _fault_metrics(stats)
        yield from _routing_metrics(stats)
        if stats.spec is not None:
            yield from _spec_metrics(stats.spec)


def _family(kind: type, name: str, doc: str, labels: list[str], rows) -> Metric:
    """A metric family with one sample per row: (label values..., value)."""
    family = kind(name, doc, labels=labels)
    for *values, value in rows:
        family.add_metric(list(values), value)
    return family


def _counter(name: str, doc: str, labels: list[str], rows) -> Metric:
    return _family(CounterMetricFamily, name, doc, labels, rows)


def _gauge(name: str, doc: str, labels: list[str], rows) -> Metric:
    return _family(GaugeMetricFamily, name, doc, labels, rows)


def _routing_metrics(stats: EngineStats) -> Iterator[Metric]:
    routing = stats.routing
    yield _counter(
        "tandem_prefill_location",
        "Placements by where the prompt was prefilled: remote (a prefill worker, KV transferred) "
        "or local (on its decode worker: short, prefill_busy, no_prefill_worker, recompute, "
        "n_fork).",
        ["where", "reason"], routing.prefill_locations,
    )  # fmt: skip
    yield _counter(
        "tandem_routing_decisions",
        "Workers chosen, by pool and why: prefix (it held part of the prompt), load, round_robin.",
        ["pool", "reason"], routing.decisions,
    )  # fmt: skip
    yield _counter("tandem_prefix_hit_tokens", "Prompt tokens found in a worker's prefix cache.",
                   ["pool"], routing.prefix_hit_tokens)  # fmt: skip


def _fault_metrics(stats: EngineStats) -> Iterator[Metric]:
    faults = stats.faults
    yield _counter(
        "tandem_request_retries",
        "New attempts after a fault, by where the failed attempt was (queued, prefill, transfer, "
        "decode) and why (worker_died, worker_hung, step_failed, transfer_failed ...).",
        ["stage", "reason"], faults.retries,
    )  # fmt: skip
    yield _counter(
        "tandem_request_migrations",
        "Retries that resumed a request after tokens had been streamed (prompt + tokens so far "
        "prefilled again).",
        [], [(faults.migrations,)],
    )  # fmt: skip
    yield _counter("tandem_worker_restarts", "Workers replaced after dying, hanging or failing.",
                   ["pool"], faults.restarts)  # fmt: skip
    yield _counter(
        "tandem_kv_leases_revoked_blocks",
        "KV blocks the lease audit freed: held for requests the coordinator had ended.",
        [], [(faults.leases_revoked,)],
    )  # fmt: skip
    health = sorted(stats.health.items())
    yield _gauge("tandem_workers_live", "Live workers per pool.", ["pool"],
                 [(pool, h.live) for pool, h in health])  # fmt: skip
    yield _gauge("tandem_workers_target", "Target workers per pool.", ["pool"],
                 [(pool, h.target) for pool, h in health])  # fmt: skip


def _spec_metrics(spec: SpecStats) -> Iterator[Metric]:
    yield _counter("tandem_spec_draft_tokens", "Speculative tokens proposed and verified.", [],
                   [(spec.draft_tokens,)])  # fmt: skip
    yield _counter("tandem_spec_accepted_tokens",
                   "Speculative tokens accepted by the target model.", [],
                   [(spec.accepted_tokens,)])  # fmt: skip
    per_position = zip(spec.accepted_per_position, spec.proposed_per_position, strict=True)
    yield _gauge(
        "tandem_spec_acceptance_rate",
        "Accepted / proposed speculative tokens at each draft position (0 = first).",
        ["position"], [(str(j), a / n if n else 0.0) for j, (a, n) in enumerate(per_position)],
    )  # fmt: skip
    yield _gauge("tandem_spec_mean_acceptance_length",
                 "Tokens emitted per verification step (accepted drafts + 1).", [],
                 [(spec.mean_acceptance_length,)])  # fmt: skip
