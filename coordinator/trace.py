"""A trace of every request: what happened to it, when and where, kept for the recent ones.

The timestamps live on the request's record and its attempts (request_state.py), in seconds since
the request arrived; this module turns them into

    trace_json(rec)     GET /v1/requests/{id}/trace and one line of the JSON-lines trace log:
                        every attempt (workers, blocks, transfer bytes, failure and what followed)
                        and every event (route, reserved, fault, retry, recompute, finish ...)
    summary(rec)        the status page's waterfall: phases queue / prefill / transfer / decode
                        per attempt (a retried attempt's phases are marked "#n")

``TraceRecorder`` keeps the in-flight records and a bounded ring of finished ones, appends each
finished request to ``coordinator.tracing.log`` (JSON lines) if set, and exports OpenTelemetry
spans (one per request, a child per phase, with their real start and end times) when
``coordinator.tracing.otel`` names an exporter.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from coordinator.request_state import Attempt, RequestRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TracePhase:
    """One phase of a request, in seconds since the request arrived."""

    name: str  # "queue", "prefill", "transfer", "decode"; "#n" marks attempt n > 0
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_s <= self.end_s:
            raise ValueError(f"phase {self.name}: need 0 <= start_s <= end_s, got {self}")


@dataclass(frozen=True)
class TraceSummary:
    """What the status page's waterfall shows of one recent request."""

    request_id: str
    phases: tuple[TracePhase, ...]
    retries: int = 0
    migrations: int = 0
    finish_reason: str | None = None  # None: still running

    def to_json(self) -> dict:
        return {
            "id": self.request_id,
            "phases": [dataclasses.asdict(p) for p in self.phases],
            "retries": self.retries,
            "migrations": self.migrations,
            "finish_reason": self.finish_reason,
        }


def attempt_phases(attempt: Attempt, now_s: float) -> list[TracePhase]:
    """queue (placing) -> prefill (until its first token) -> transfer (remote: until decode's
    first token) -> decode (until its end); phases not reached yet are left out, a running
    one ends ``now_s``."""
    mark = f" #{attempt.number}" if attempt.number else ""
    end = attempt.ended_s if attempt.ended_s is not None else now_s
    bounds = [("queue", attempt.started_s, attempt.placed_s)]
    if attempt.placed_s is not None:
        bounds.append(("prefill", attempt.placed_s, attempt.first_token_s))
    if attempt.first_token_s is not None:
        decode_from = attempt.first_token_s
        if attempt.remote:
            bounds.append(("transfer", attempt.first_token_s, attempt.decode_s))
            decode_from = attempt.decode_s
        if decode_from is not None:
            bounds.append(("decode", decode_from, end))
    phases = []
    for name, start, stop in bounds:
        stop = end if stop is None else stop
        phases.append(TracePhase(name + mark, start, max(start, stop)))
    return phases


def retries_and_migrations(rec: RequestRecord) -> tuple[int, int]:
    followed = [a for a in rec.attempts if a.next_action in ("retry", "recompute")]
    return len(followed), sum(1 for a in rec.attempts[1:] if a.resume_token_ids)


def summary(rec: RequestRecord) -> TraceSummary:
    now_s = rec.ended_s if rec.ended_s is not None else rec.elapsed()
    phases = tuple(p for a in rec.attempts for p in attempt_phases(a, now_s))
    retries, migrations = retries_and_migrations(rec)
    return TraceSummary(rec.request_id, phases, retries, migrations, rec.finish_reason)


def _worker(worker: Any) -> str | None:
    return None if worker is None else f"{worker.name}#{worker.incarnation}"


def trace_json(rec: RequestRecord) -> dict:
    retries, migrations = retries_and_migrations(rec)
    attempts = []
    for a in rec.attempts:
        decode = a.decode
        per_block = getattr(decode, "bytes_per_block", 0) if a.remote else 0
        attempts.append({
            "number": a.number,
            "wire_id": a.wire_id,
            "prefill_worker": _worker(a.prefill),
            "decode_worker": _worker(decode),
            "where": "remote" if a.remote else "local",
            "local_reason": a.local_why,  # why it prefilled on its serving worker (None: remote)
            "resumed_after_tokens": len(a.resume_token_ids),
            "kv_blocks": a.num_blocks,
            "cached_blocks": a.num_cached_blocks,
            "transfer_bytes": ((a.num_blocks - a.num_cached_blocks) * per_block
                               if a.decode_s is not None else 0),
            "tokens": a.num_tokens,
            "started_s": a.started_s, "placed_s": a.placed_s, "first_token_s": a.first_token_s,
            "decode_s": a.decode_s, "ended_s": a.ended_s,
            "failure": None if a.failure is None else dict(zip(("stage", "fault", "message"),
                                                               a.failure, strict=True)),
            "then": a.next_action,
        })  # fmt: skip
    return {
        "id": rec.request_id,
        "arrival_unix_s": rec.arrival_wall,
        "finish_reason": rec.finish_reason,
        "error": rec.error,
        "num_prompt_tokens": len(rec.prompt_token_ids),
        "num_output_tokens": rec.num_output_tokens,
        "retries": retries,
        "migrations": migrations,
        "attempts": attempts,
        "events": [{"t_s": t, "name": name, "detail": detail} for t, name, detail in rec.events],
        "phases": [dataclasses.asdict(p) for p in summary(rec).phases],
    }


class TraceRecorder:
    def __init__(self, keep: int, log_path: str | None = None, otel: str = "none") -> None:
        self.live: dict[str, RequestRecord] = {}
        self.done: collections.deque[RequestRecord] = collections.deque(maxlen=keep)
        self._log: IO[str] | None = open(log_path, "a") if log_path else None  # noqa: SIM115
        self._tracer = make_tracer(otel)

    def start(self, rec: RequestRecord) -> None:
        self.live[rec.request_id] = rec

    def finish(self, rec: RequestRecord) -> None:
        self.live.pop(rec.request_id, None)
        self.done.append(rec)
        if self._log is not None:
            self._log.write(json.dumps(trace_json(rec), separators=(",", ":")) + "\n")
            self._log.flush()
        if self._tracer is not None:
            export_spans(self._tracer, rec)

    def get(self, request_id: str) -> RequestRecord | None:
        rec = self.live.get(request_id)
        if rec is None:
            rec = next((r for r in reversed(self.done) if r.request_id == request_id), None)
        return rec

    def recent(self, limit: int = 50) -> list[TraceSummary]:
        """In-flight requests, then finished ones, most recent first."""
        recs: Iterable[RequestRecord] = [*reversed(self.live.values()), *reversed(self.done)]
        return [summary(r) for _, r in zip(range(limit), recs, strict=False)]

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def make_tracer(otel: str) -> Any:
    """An OpenTelemetry tracer exporting to ``otel`` ("console", or "otlp": OTLP over HTTP to
    OTEL_EXPORTER_OTLP_ENDPOINT), None for "none". The SDK is imported only here."""
    if otel == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if otel == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "tandem"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider.get_tracer("tandem.coordinator")


def export_spans(tracer: Any, rec: RequestRecord) -> None:
    """One span for the request and a child per phase, at their real times (ns since epoch)."""
    from opentelemetry import trace

    base_ns = int(rec.arrival_wall * 1e9)

    def ns(offset_s: float) -> int:  # offsets added in ns: a float of ~1.8e18 ns is 256 ns coarse
        return base_ns + round(offset_s * 1e9)

    end_s = rec.ended_s if rec.ended_s is not None else rec.elapsed()
    retries, migrations = retries_and_migrations(rec)
    root = tracer.start_span("request", start_time=ns(0.0), attributes={
        "tandem.request_id": rec.request_id, "tandem.finish_reason": rec.finish_reason or "",
        "tandem.retries": retries, "tandem.migrations": migrations,
        "tandem.prompt_tokens": len(rec.prompt_token_ids),
        "tandem.output_tokens": rec.num_output_tokens,
    })  # fmt: skip
    context = trace.set_span_in_context(root)
    for phase in summary(rec).phases:
        span = tracer.start_span(phase.name, context=context, start_time=ns(phase.start_s))
        span.end(end_time=ns(phase.end_s))
    root.end(end_time=ns(end_s))
