"""Serving metrics with the definitions of vLLM's ``bench serve`` (vllm/benchmarks/serve.py,
``calculate_metrics``), computed from each request's client-side timestamps:

    TTFT     first token chunk - request sent
    ITL      gap between consecutive token chunks (one value per chunk after the first)
    TPOT     (E2E - TTFT) / (output tokens - 1), per request with more than one output token
    E2E      last token chunk - request sent
    request throughput   completed requests / run duration
    output throughput    output tokens of completed requests / run duration
    total throughput     (prompt + output tokens) / run duration
    goodput              completed requests meeting every SLO target / run duration; a request
                         with a single output token has TPOT 0 for this check, and a target is
                         met when the value is <= it

Percentiles interpolate linearly between ranks (``numpy.percentile``'s default). A failed
request counts in ``failed`` only. Run duration: first request sent -> last one done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (90, 99)


@dataclass(frozen=True)
class Slo:
    """Targets in milliseconds; None: not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @staticmethod
    def parse(text: str) -> Slo:
        """``"ttft_ms=500,tpot_ms=50"`` (either key may be left out, not both)."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("ttft_ms", "tpot_ms"):
                raise ValueError(f"--slo: expected ttft_ms=MS,tpot_ms=MS, got {item!r}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"--slo: {key.strip()} must be a number, got {value!r}") from None
            if not number > 0:
                raise ValueError(f"--slo: {key.strip()} must be > 0, got {value!r}")
            values[key.strip()] = number
        if not values:
            raise ValueError("--slo: set at least one of ttft_ms, tpot_ms")
        return Slo(**values)

    def met_by(self, result: RequestResult) -> bool:
        if self.ttft_ms is not None and 1000.0 * result.ttft_s > self.ttft_ms:
            return False
        return self.tpot_ms is None or 1000.0 * result.tpot_s <= self.tpot_ms


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it (seconds, ``time.perf_counter`` based)."""

    start_s: float  # when it was sent, from the start of the run
    ttft_s: float = 0.0
    itls_s: tuple[float, ...] = ()
    latency_s: float = 0.0  # E2E: last token chunk - sent
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float:
        """0 for a single output token (vLLM's convention for goodput)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        row = {
            "start_s": round(self.start_s, 6),
            "ttft_ms": round(1000 * self.ttft_s, 3),
            "tpot_ms": round(1000 * self.tpot_s, 3),
            "e2e_ms": round(1000 * self.latency_s, 3),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        }
        return row if self.ok else {**row, "error": self.error}


def distribution(values_s: list[float]) -> dict:
    """mean / median / p90 / p99 in milliseconds (None when there is no value)."""
    if not values_s:
        return {"mean": None, "median": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = 1000.0 * np.asarray(values_s, dtype=np.float64)
    out = {"mean": float(ms.mean()), "median": float(np.median(ms))}
    out.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


def summarize(results: list[RequestResult], duration_s: float, slo: Slo | None) -> dict:
    ok = [r for r in results if r.ok]
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    good = sum(slo.met_by(r) for r in ok) if slo is not None else None
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": None if good is None else good / duration_s,
        "good_requests": good,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "ttft_ms": distribution([r.ttft_s for r in ok]),
        "tpot_ms": distribution([r.tpot_s for r in ok if r.output_tokens > 1]),
        "itl_ms": distribution([x for r in ok for x in r.itls_s]),
        "e2e_ms": distribution([r.latency_s for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
