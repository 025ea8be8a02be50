"""The last minute of a coordinator's traffic, for the status page.

Prometheus histograms are cumulative and bucketed; a person watching the page wants "now":
exact TTFT / ITL percentiles and request rates over a sliding window.

    LatencyWindow  (time, seconds) samples -> count and p50 / p90 / p99 in ms over the window
    EventWindow    event times -> events per second over the window
    CounterRate    readings of a cumulative counter -> its rate over the last few seconds

Times are ``time.monotonic()`` seconds, passed in so that tests control the clock. Memory is
bounded: past ``MAX_SAMPLES`` the oldest samples go first, and the window then covers less than
a minute (only at thousands of tokens per second).
"""

from __future__ import annotations

import math
from collections import deque

WINDOW_S = 60.0
MAX_SAMPLES = 50_000
RATE_SPAN_S = 10.0  # a counter's rate is taken over its readings of the last 10 s


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default ``np.percentile``)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    frac = pos - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac


class LatencyWindow:
    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now: float, seconds: float, count: int = 1) -> None:
        for _ in range(count):
            self._samples.append((now, seconds))

    def summary(self, now: float) -> dict:
        """``{"count", "p50", "p90", "p99"}`` in milliseconds (None when the window is empty)."""
        _drop_before(self._samples, now - self.window_s)
        values = sorted(v for _, v in self._samples)
        out: dict = {"count": len(values)}
        for q in (50, 90, 99):
            out[f"p{q}"] = 1000.0 * percentile(values, q) if values else None
        return out


class EventWindow:
    def __init__(self, started: float, window_s: float = WINDOW_S) -> None:
        self.started = started
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=MAX_SAMPLES)

    def add(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float) -> int:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        return len(self._times)

    def rate(self, now: float) -> float:
        """Events per second over the window (over the uptime while that is shorter, but at
        least a second: one early event is not a burst of thousands per second)."""
        span = min(self.window_s, now - self.started)
        return self.count(now) / max(span, 1.0)


class CounterRate:
    def __init__(self, span_s: float = RATE_SPAN_S) -> None:
        self.span_s = span_s
        self._readings: deque[tuple[float, float]] = deque()

    def rate(self, now: float, total: float) -> float | None:
        """Record ``total`` at ``now``; its growth per second since the oldest reading of the
        last ``span_s`` (None until two readings exist). A counter that went down (an engine
        that restarted) starts over."""
        if self._readings and total < self._readings[-1][1]:
            self._readings.clear()
        self._readings.append((now, total))
        while len(self._readings) > 2 and self._readings[1][0] <= now - self.span_s:
            self._readings.popleft()
        (t0, v0), (t1, v1) = self._readings[0], self._readings[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


def _drop_before(samples: deque[tuple[float, float]], cutoff: float) -> None:
    while samples and samples[0][0] < cutoff:
        samples.popleft()


class RecentTraffic:
    """What the status page reports about the last minute, fed by ``ServerMetrics``."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.ttft = LatencyWindow()
        self.itl = LatencyWindow()
        self.admitted = EventWindow(started)
        self.finished = EventWindow(started)  # stop or length, no error
        self.good = EventWindow(started)  # finished within coordinator.slo
        self.transfer_bytes = CounterRate()
