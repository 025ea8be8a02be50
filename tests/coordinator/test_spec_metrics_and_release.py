"""Speculation counters reach /metrics exactly; the coordinator releases (not quarantines) a
decode reservation that no KV was or will be written into."""

from __future__ import annotations

from types import SimpleNamespace

from coordinator.engine_client import EngineStats, SpecStats
from coordinator.metrics import ServerMetrics
from coordinator.ray_client import RayEngineClient
from coordinator.request_state import RequestRecord


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


def test_end_method_releases_only_unwritten_reservations():
    decode = SimpleNamespace(role="decode")
    prefill = SimpleNamespace(role="prefill")
    colocated = SimpleNamespace(role="colocated")
    end = RayEngineClient._end_method
    queued = RequestRecord("q", 10, decode_worker="decode-0")
    assert end(queued, decode, None) == "release"  # prefill never asked
    rec = RequestRecord("r", 10, decode_worker="decode-0", prefill_worker="prefill-0")
    assert end(rec, decode, "prefill-0") == "release"  # token 1 ended it: no KV sent
    assert end(rec, decode, None) == "abort"  # KV may be in flight: quarantine
    assert end(rec, prefill, None) == "abort"
    assert end(RequestRecord("c", 10, decode_worker="colocated-0"), colocated, None) == "abort"
