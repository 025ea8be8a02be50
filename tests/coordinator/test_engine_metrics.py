"""Speculation and fault-tolerance counters reach /metrics exactly."""

from __future__ import annotations

from coordinator.engine_client import EngineStats, FaultStats, PoolHealth, SpecStats
from coordinator.metrics import ServerMetrics


def test_spec_metrics_render_exact_values():
    m = ServerMetrics()
    m.set_engine_stats(EngineStats(spec=SpecStats(10, 6, 4, (4, 2), (4, 4))))
    text = m.render().decode()
    assert "tandem_spec_draft_tokens_total 10.0" in text
    assert "tandem_spec_accepted_tokens_total 6.0" in text
    assert 'tandem_spec_acceptance_rate{position="0"} 1.0' in text
    assert 'tandem_spec_acceptance_rate{position="1"} 0.5' in text
    assert "tandem_spec_mean_acceptance_length 2.5" in text  # (6 + 4) / 4


def test_no_spec_metrics_without_speculation():
    m = ServerMetrics()
    m.set_engine_stats(EngineStats())
    assert "tandem_spec_" not in m.render().decode()


def test_fault_metrics_render_exact_values():
    m = ServerMetrics()
    faults = FaultStats(retries=(("decode", "worker_died", 3), ("prefill", "step_failed", 1)),
                        migrations=3, restarts=(("decode", 1),), leases_revoked=2)  # fmt: skip
    health = {"prefill": PoolHealth(1, 1), "decode": PoolHealth(1, 2)}
    m.set_engine_stats(EngineStats(faults=faults, health=health))
    text = m.render().decode()
    assert 'tandem_request_retries_total{reason="worker_died",stage="decode"} 3.0' in text
    assert 'tandem_request_retries_total{reason="step_failed",stage="prefill"} 1.0' in text
    assert "tandem_request_migrations_total 3.0" in text
    assert 'tandem_worker_restarts_total{pool="decode"} 1.0' in text
    assert "tandem_kv_leases_revoked_blocks_total 2.0" in text
    assert 'tandem_workers_live{pool="decode"} 1.0' in text
    assert 'tandem_workers_target{pool="decode"} 2.0' in text
