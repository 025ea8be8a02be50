"""Talking to a served model over HTTP (plain requests, aiohttp for concurrent streams), and the
prompts and parameters the e2e tests share."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import requests

from core.sampling_params import SamplingParams
from tests.prompts import CHAT_PROMPTS  # noqa: F401 (re-exported for the e2e conftest)

MODEL = "smollm2-135m-instruct"
TEXT_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a kingdom by the sea, there lived a",
    "def fibonacci(n):",
    "Water boils at",
]


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def complete(url: str, **body: object) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=120)


def metric_above(
    url: str, name: str, floor: float, timeout_s: float = 10.0, **labels: str
) -> float:
    """``name{labels}`` once it exceeds ``floor``: worker counters reach /metrics with the next
    stats poll, not with the response."""
    deadline = time.monotonic() + timeout_s
    while (value := metric(url, name, default=floor, **labels)) <= floor:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}"
        time.sleep(0.1)
    return value


def metric_settled(
    url: str, name: str, at_least: float, timeout_s: float = 30.0, **labels: str
) -> float:
    """A cumulative worker counter once it reached ``at_least`` and held still over a second
    (two stats polls): for exact counts, where ``metric_above`` could catch it half-way."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        value = metric(url, name, default=0, **labels)
        if value >= at_least and value == last:
            return value
        assert time.monotonic() < deadline, f"{name}{labels} stuck at {value} (< {at_least})"
        last = value
        time.sleep(1.0)


def metric(url: str, name: str, default: float | None = None, **labels: str) -> float:
    """One sample of /metrics (labels must match exactly); ``default`` if it has none yet."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as rendered
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$", re.M)
    match = pattern.search(text)
    if match is None and default is not None:
        return default
    if match is None:
        raise AssertionError(f"no sample {name}{{{wanted}}} in /metrics")
    return float(match.group(1))


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    stop_after: int | None = None,
    request_id: str | None = None,
    **body: object,
) -> tuple[str, str | None, list[dict]]:
    """POST a streamed completion; returns (text, finish_reason, events). ``stop_after``: leave
    (close the connection) after that many text chunks; ``request_id``: its x-request-id."""
    payload = {"model": MODEL, "stream": True, **body}
    headers = {"x-request-id": request_id} if request_id else None
    text, finish, events = [], None, []
    async with session.post(f"{url}/v1/completions", json=payload, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            events.append(event)
            if "error" in event:
                break
            choice = event["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
            if stop_after is not None and len(text) >= stop_after:
                response.close()  # drop the connection mid-stream, like a client that left
                break
    return "".join(text), finish, events


def run_concurrently(
    url: str, bodies: list[dict], stop_after: int | None = None, ids: list[str] | None = None
) -> list:
    """``ids``: an x-request-id for each body."""
    names = ids or [None] * len(bodies)

    async def main() -> list:
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)  # every request on its own connection
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            return await asyncio.gather(*(
                stream_completion(session, url, stop_after, rid, **b)
                for b, rid in zip(bodies, names, strict=True)
            ))  # fmt: skip

    return asyncio.run(main())

