"""Request traces, exactly: phases from the timestamps of a disaggregated request, a retried one
and an aborted one; the JSON a client reads; the bounded ring, the JSON-lines log, and the
OpenTelemetry spans (SDK in-memory exporter)."""

from __future__ import annotations

import json

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator.request_state import Phase, RequestRecord
from coordinator.trace import TracePhase, TraceRecorder, export_spans, summary, trace_json
from coordinator.worker_pool import WorkerRef
from core.sampling_params import SamplingParams

PREFILL = WorkerRef("prefill-0", "prefill", None, 64, 16, incarnation=0)
DECODE = WorkerRef("decode-1", "decode", None, 64, 16, bytes_per_block=1000, incarnation=2)


def disaggregated(request_id: str = "cmpl-a") -> RequestRecord:
    rec = RequestRecord(request_id, (1, 2, 3), SamplingParams(max_tokens=4))
    a = rec.new_attempt(())
    a.started_s, a.placed_s, a.prefill, a.decode, a.num_blocks = 0.0, 0.1, PREFILL, DECODE, 3
    a.observe(1, 0.5)  # token 1 from prefill
    a.observe(3, 0.8)  # decode takes over
    a.ended_s, rec.ended_s, rec.finish_reason, rec.num_output_tokens = 1.2, 1.2, "length", 4
    return rec


def test_phases_of_a_disaggregated_request():
    assert summary(disaggregated()).phases == (
        TracePhase("queue", 0.0, 0.1), TracePhase("prefill", 0.1, 0.5),
        TracePhase("transfer", 0.5, 0.8), TracePhase("decode", 0.8, 1.2))  # fmt: skip
    body = trace_json(disaggregated())
    (attempt,) = body["attempts"]
    assert attempt["prefill_worker"] == "prefill-0#0" and attempt["decode_worker"] == "decode-1#2"
    assert (attempt["kv_blocks"], attempt["transfer_bytes"], attempt["where"]) == (3, 3000,
                                                                                  "remote")
    assert (body["finish_reason"], body["num_output_tokens"], body["retries"]) == ("length", 4, 0)


def test_a_migrated_request_shows_both_attempts_and_why():
    rec = RequestRecord("cmpl-m", (1, 2), SamplingParams())
    first = rec.new_attempt(())
    first.started_s, first.placed_s, first.prefill, first.decode = 0.0, 0.1, PREFILL, DECODE
    first.observe(1, 0.4)
    first.ended_s, first.failure = 0.6, ("transfer", "transfer_failed", "KV transfer failed")
    first.next_action = "recompute"
    second = rec.new_attempt((7,), local_on=DECODE)
    second.decode, second.started_s, second.placed_s = DECODE, 0.6, 0.65
    second.observe(2, 0.9)
    second.ended_s = rec.ended_s = 1.0
    rec.finish_reason = "stop"
    assert [(p.name, p.start_s, p.end_s) for p in summary(rec).phases] == [
        ("queue", 0.0, 0.1), ("prefill", 0.1, 0.4), ("transfer", 0.4, 0.6),
        ("queue #1", 0.6, 0.65), ("prefill #1", 0.65, 0.9), ("decode #1", 0.9, 1.0)]  # fmt: skip
    body = trace_json(rec)
    assert (body["retries"], body["migrations"]) == (1, 1)
    assert body["attempts"][0]["failure"] == {"stage": "transfer", "fault": "transfer_failed",
                                              "message": "KV transfer failed"}  # fmt: skip
    assert body["attempts"][0]["then"] == "recompute"
    assert body["attempts"][0]["transfer_bytes"] == 0  # it never landed
    assert body["attempts"][1]["resumed_after_tokens"] == 1
    assert body["attempts"][1]["where"] == "local"


def test_an_aborted_request_ends_where_it_was():
    rec = RequestRecord("cmpl-x", (1,), SamplingParams())
    a = rec.new_attempt(())
    a.started_s, a.placed_s, a.prefill, a.decode, a.phase = 0.0, 0.2, PREFILL, DECODE, Phase.DONE
    a.ended_s, rec.ended_s, rec.finish_reason = 0.3, 0.3, "abort"
    assert [(p.name, p.end_s) for p in summary(rec).phases] == [("queue", 0.2), ("prefill", 0.3)]


def test_recorder_ring_log_and_lookup(tmp_path):
    path = tmp_path / "traces.jsonl"
    recorder = TraceRecorder(keep=2, log_path=str(path))
    recs = [disaggregated(f"cmpl-{i}") for i in range(3)]
    for rec in recs:
        recorder.start(rec)
    assert recorder.get("cmpl-1") is recs[1]  # in flight
    for rec in recs:
        recorder.finish(rec)
    assert recorder.get("cmpl-0") is None  # the ring keeps 2
    assert [t.request_id for t in recorder.recent()] == ["cmpl-2", "cmpl-1"]
    recorder.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["cmpl-0", "cmpl-1", "cmpl-2"]  # every one logged
    assert lines[0]["phases"][2] == {"name": "transfer", "start_s": 0.5, "end_s": 0.8}


def test_opentelemetry_spans_at_the_real_times():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rec = disaggregated()
    export_spans(provider.get_tracer("test"), rec)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "queue", "prefill", "transfer", "decode"}
    root = spans["request"]
    t0 = int(rec.arrival_wall * 1e9)
    assert (root.start_time, root.end_time) == (t0, t0 + int(1.2e9))
    assert root.attributes["tandem.request_id"] == "cmpl-a"
    transfer = spans["transfer"]
    assert transfer.parent.span_id == root.context.span_id
    assert (transfer.start_time, transfer.end_time) == (t0 + int(0.5e9), t0 + int(0.8e9))
