"""Send one workload to one server at one load point and time every request."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from tqdm import tqdm

from bench.arrivals import LoadPoint, arrival_times
from bench.openai_stream import send_request
from bench.serving_metrics import RequestResult
from bench.workloads import RequestSpec


async def run_load(
    url: str,
    endpoint: str,
    model: str,
    requests: list[RequestSpec],
    load: LoadPoint,
    headers: dict[str, str],
    *,
    timeout_s: float,
    seed: int,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
    """(results in request order, run duration in seconds: first send -> last completion)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)  # the arrivals set the concurrency, not aiohttp
    results: list[RequestResult | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            start = time.perf_counter()

            async def one(i: int) -> None:
                results[i] = await send_request(
                    session, url, endpoint, model, requests[i], headers, start
                )
                bar.update(1)

            if load.concurrency is not None:
                pending = iter(range(len(requests)))

                async def client() -> None:
                    for i in pending:  # one shared iterator: each client takes the next request
                        await one(i)

                await asyncio.gather(*(client() for _ in range(load.concurrency)))
            else:
                assert load.rate is not None
                tasks = []
                times = arrival_times(len(requests), load.rate, load.burstiness, seed)
                for i, at in enumerate(times):
                    delay = start + at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(i)))
                await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return [r for r in results if r is not None], duration
