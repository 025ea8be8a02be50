"""Request lifecycle at the front end: disconnects and timeouts abort, the queue limit answers
429, engine errors surface, and /health and /metrics report what the engine says."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from engine_double import ScriptedEngine
from serving_harness import MODEL, make_config, running_server, wait_for
from tokenizer_double import ByteTokenizer

from coordinator.engine_client import EngineStats, PoolHealth, PoolStats, TransferStats
from coordinator.server import build_app, serve

TOK = ByteTokenizer()
SLOW = {"model": MODEL, "prompt": "slow", "max_tokens": 50}


def _events(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(stream):
    engine = ScriptedEngine(token_delay_s=0.05)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                post = session.post(f"{url}/v1/completions", json={**SLOW, "stream": stream})
                if stream:
                    resp = await post
                    assert resp.status == 200
                    first = await resp.content.readuntil(b"\n\n")
                    assert first.startswith(b"data: {")
                    resp.close()  # drop the connection mid-stream
                else:
                    # No headers come back before the end: give up while the engine generates.
                    waiting = asyncio.create_task(post)
                    await wait_for(lambda: engine.requests)
                    await asyncio.sleep(0.1)
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
            await wait_for(lambda: len(engine.aborted) == 1)

    asyncio.run(main())
    (request_id, _, _) = engine.requests[0]
    assert engine.aborted == [request_id]
    assert engine.finished == []


@pytest.mark.parametrize("stream", [True, False])
def test_request_timeout_aborts(stream):
    engine = ScriptedEngine(token_delay_s=0.05)
    config = make_config(request_timeout_s=0.3)

    async def main():
        async with running_server(config, engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                body = {**SLOW, "stream": stream}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    return resp.status, await resp.read()

    status, raw = asyncio.run(main())
    if stream:
        events = _events(raw)
        assert status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert len(events) >= 3  # some tokens made it out before the deadline
    else:
        assert status == 504
        error = json.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "timeout")
    assert engine.aborted == [engine.requests[0][0]]


def test_queue_full_429_with_retry_after():
    engine = ScriptedEngine(token_delay_s=0.02)
    config = make_config(max_queued_requests=1)

    async def main():
        async with running_server(config, engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                body = {**SLOW, "max_tokens": 10}
                first = asyncio.create_task(session.post(f"{url}/v1/completions", json=body))
                await wait_for(lambda: engine.requests)
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    rejected = resp.status, resp.headers.get("Retry-After"), await resp.json()
                async with await first as resp:
                    accepted = resp.status, await resp.json()
                # Once the first finished, its slot is free again.
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    again = resp.status
                return rejected, accepted, again

    (status, retry_after, payload), (ok_status, ok_body), again = asyncio.run(main())
    assert (status, retry_after) == (429, "1")
    assert (payload["error"]["type"], payload["error"]["code"]) == (
        "rate_limit_error",
        "queue_full",
    )
    assert ok_status == 200 and ok_body["choices"][0]["finish_reason"] == "length"
    assert again == 200 and len(engine.requests) == 2


@pytest.mark.parametrize("stream", [True, False])
def test_engine_error_surfaces(stream):
    engine = ScriptedEngine(fail_after=2)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                body = {**SLOW, "stream": stream}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    return resp.status, await resp.read()

    status, raw = asyncio.run(main())
    if stream:
        events = _events(raw)
        assert events[-1] == "[DONE]" and len(events) == 2 + 1 + 1  # 2 tokens, error, DONE
        error = json.loads(events[-2])["error"]
    else:
        assert status == 500
        error = json.loads(raw)["error"]
    assert error["code"] == "engine_error" and "worker died" in error["message"]


@pytest.mark.parametrize("stream", [True, False])
def test_stream_ending_without_finish_is_an_error_and_aborts(stream):
    engine = ScriptedEngine(vanish_after=2)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                body = {**SLOW, "stream": stream}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    return resp.status, await resp.read()

    status, raw = asyncio.run(main())
    if stream:
        events = _events(raw)
        assert events[-1] == "[DONE]" and len(events) == 2 + 1 + 1
        error = json.loads(events[-2])["error"]
    else:
        assert status == 500
        error = json.loads(raw)["error"]
    assert "without finishing" in error["message"]
    assert engine.aborted == [engine.requests[0][0]]  # its blocks must still be freed


UP, DOWN, HALF = PoolHealth(1, 1), PoolHealth(0, 1), PoolHealth(1, 2)


@pytest.mark.parametrize(
    ("mode", "live", "expected", "status"),
    [
        ("disaggregated", {"prefill": UP, "decode": UP}, 200, "ok"),
        ("disaggregated", {"prefill": UP, "decode": HALF}, 200, "degraded"),  # one restarting
        ("disaggregated", {"prefill": UP, "decode": DOWN}, 503, "unavailable"),
        ("disaggregated", {"prefill": UP}, 503, "unavailable"),  # an unreported pool is down
        ("colocated", {"colocated": UP}, 200, "ok"),
        ("colocated", {"decode": UP}, 503, "unavailable"),
    ],
)
def test_health(mode, live, expected, status):
    engine = ScriptedEngine(live=live)

    async def main():
        async with running_server(make_config(mode=mode), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/health") as resp:
                    return resp.status, await resp.json()

    code, body = asyncio.run(main())
    assert code == expected
    assert body["status"] == status
    assert set(body["pools"]) == ({"colocated"} if mode == "colocated" else {"prefill", "decode"})
    for name, pool in body["pools"].items():
        health = live.get(name, PoolHealth(0, 0))
        assert pool == {"status": health.status, "live": health.live, "target": health.target}


def test_metrics_names_and_values():
    stats = EngineStats(
        pools=(PoolStats("prefill", 3, 64, 1, 2), PoolStats("decode", 40, 512, 5, 0)),
        transfers=(TransferStats("nixl", 123456, 0.25),),
        num_running=5,
        num_waiting=2,
    )
    engine = ScriptedEngine(snapshot=stats, tokens_per_delta=1)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "m", "max_tokens": 4}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                async with session.post(f"{url}/v1/completions", json={"prompt": 1}) as resp:
                    assert resp.status == 400
                async with session.get(f"{url}/metrics") as resp:
                    return resp.headers["Content-Type"], await resp.text()

    content_type, text = asyncio.run(main())
    assert content_type.startswith("text/plain")
    lines = set(text.splitlines())
    for expected in (
        'tandem_requests_total{endpoint="completions",outcome="length"} 1.0',
        'tandem_requests_total{endpoint="completions",outcome="rejected_400"} 1.0',
        "tandem_time_to_first_token_seconds_count 1.0",
        "tandem_inter_token_latency_seconds_count 3.0",  # 4 tokens, one at a time: 3 gaps
        'tandem_kv_blocks_used{pool="prefill"} 3.0',
        'tandem_kv_blocks_used{pool="decode"} 40.0',
        'tandem_kv_blocks_total{pool="decode"} 512.0',
        'tandem_kv_transfer_bytes_total{backend="nixl"} 123456.0',
        'tandem_kv_transfer_seconds_total{backend="nixl"} 0.25',
        "tandem_running_requests 5.0",
        "tandem_waiting_requests 2.0",
        "tandem_coordinator_in_flight_requests 0.0",
    ):
        assert expected in lines, expected
    for histogram in ("tandem_time_to_first_token_seconds", "tandem_inter_token_latency_seconds"):
        assert f"# TYPE {histogram} histogram" in lines


def test_two_servers_in_one_process_do_not_share_metrics():
    # A shared (global) registry would raise "Duplicated timeseries" on the second build.
    first = build_app(make_config(), ScriptedEngine(), TOK)
    second = build_app(make_config(), ScriptedEngine(), TOK)
    assert first is not second


def test_serve_runs_until_cancelled_and_releases_the_port():
    engine = ScriptedEngine()
    config = make_config()

    async def main():
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(config, engine, TOK, on_ready=ready.set_result))
        port = await asyncio.wait_for(ready, 10)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                status = resp.status
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"http://127.0.0.1:{port}/health")
        return status

    assert asyncio.run(main()) == 200


def test_concurrent_burst_admits_exactly_the_limit():
    engine = ScriptedEngine(token_delay_s=0.05)
    config = make_config(max_queued_requests=2)

    async def main():
        async with running_server(config, engine, TOK) as url:
            async with aiohttp.ClientSession() as session:

                async def one() -> int:
                    body = {**SLOW, "max_tokens": 4}
                    async with session.post(f"{url}/v1/completions", json=body) as resp:
                        await resp.read()
                        return resp.status

                return sorted(await asyncio.gather(*(one() for _ in range(6))))

    assert asyncio.run(main()) == [200, 200, 429, 429, 429, 429]
    assert len(engine.requests) == 2


def test_closed_loop_at_the_limit_never_sees_429():
    """A slot is free once the request's last delta is produced, not when the engine's wind-down
    (the Ray client's end-of-request worker calls) is over: as many clients as the limit, each
    starting its next stream as soon as it has read [DONE], are never refused. Each client
    alternates between two keep-alive sessions, so its next request arrives on another connection
    while the previous one stays open (a closed one would cancel its handler, which frees the slot
    too: a race with the next request that a loaded server loses)."""
    engine = ScriptedEngine(wind_down_s=0.3)
    config = make_config(max_queued_requests=2)

    async def main():
        async with running_server(config, engine, TOK) as url:

            async def client() -> list[int]:
                statuses = []
                async with aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
                    for session in (a, b, a):
                        body = {**SLOW, "max_tokens": 3, "stream": True}
                        async with session.post(f"{url}/v1/completions", json=body) as resp:
                            raw = await resp.read()
                            statuses.append(resp.status)
                        assert resp.status != 200 or _events(raw)[-1] == "[DONE]"
                return statuses

            return await asyncio.gather(client(), client())

    assert asyncio.run(main()) == [[200] * 3, [200] * 3]
    assert len(engine.requests) == 6
