"""When requests are sent: open loop at a rate (Poisson, or gamma with a burstiness factor) or
closed loop at a concurrency.

Open loop as vLLM's ``bench serve`` (``get_request``): gaps between arrivals are gamma
distributed with shape = burstiness and mean 1 / rate (burstiness 1 is a Poisson process; below
1 burstier, above 1 more even), and the cumulative times are then scaled so that the last
request goes out at exactly num_requests / rate, which keeps the offered rate exact for any
seed. Rate ``inf`` sends everything at once. Closed loop keeps ``concurrency`` requests in
flight: each one that ends sends the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadPoint:
    rate: float | None = None  # requests/s (open loop); math.inf: all at once
    burstiness: float = 1.0
    concurrency: int | None = None  # closed loop

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a load point has either a rate or a concurrency")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"request rates must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
        return f"rate {rate}/s" + ("" if self.burstiness == 1.0 else f" b={self.burstiness:g}")

    def to_json(self) -> dict:
        rate = None if self.rate is None else ("inf" if math.isinf(self.rate) else self.rate)
        return {"rate": rate, "burstiness": self.burstiness, "concurrency": self.concurrency}


def arrival_times(num_requests: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times in seconds from the start of the run, non-decreasing."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)
    times = np.cumsum(gaps)
    times *= (num_requests / rate) / times[-1]
    return times.tolist()


def parse_rates(text: str) -> list[float]:
    """``"0.5,1,2,inf"``."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--rates: expected numbers or inf, got {text!r}") from None
    if not rates:
        raise ValueError("--rates: no rate given")
    return rates
