"""GET /v1/status (schema in docs/serving.md) from a real server over the engine double, the
status page's routes, the API key on them, and x-request-id on every response."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from engine_double import ScriptedEngine
from serving_harness import MODEL, make_config, running_server
from tokenizer_double import ByteTokenizer

from coordinator.engine_client import EngineStats, PoolStats, TransferStats, WorkerStatus
from coordinator.server import bound_port, build_app, start_server
from coordinator.trace import TracePhase, TraceSummary

TOK = ByteTokenizer()
WORKERS = (
    WorkerStatus("prefill-0", "prefill", True, 0, 1, 2, 10, 256),
    WorkerStatus("decode-0", "decode", True, 0, 3, 0, 40, 1024),
    WorkerStatus("decode-1", "decode", False, 1, 0, 0, 0, 1024),
)
SNAPSHOT = EngineStats(
    pools=(PoolStats("prefill", 10, 256, 1, 2), PoolStats("decode", 40, 2048, 3, 0)),
    transfers=(TransferStats("nixl", 4096, 0.5),),
    num_running=3,
    num_waiting=2,
    workers=WORKERS,
)
TRACE = TraceSummary(
    "cmpl-1", (TracePhase("prefill", 0.0, 0.2), TracePhase("decode", 0.25, 1.0)), retries=1
)


async def _get(session: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict, dict]:
    async with session.get(url, **kw) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, dict(r.headers), body


def test_status_reports_engine_workers_traces_and_recent_latency():
    engine = ScriptedEngine(token_delay_s=0.01, snapshot=SNAPSHOT)
    config = make_config(slo={"ttft_ms": 1000, "tpot_ms": 500})

    async def main():
        app = build_app(config, engine, TOK, recent_traces=lambda: [TRACE])
        runner = await start_server(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{bound_port(runner)}"
        try:
            async with aiohttp.ClientSession() as s:
                _, _, before = await _get(s, f"{url}/v1/status")
                body = {"model": MODEL, "prompt": "ab", "max_tokens": 4}
                for r in await asyncio.gather(
                    *(s.post(f"{url}/v1/completions", json=body) for _ in range(3))
                ):
                    await r.read()
                _, _, after = await _get(s, f"{url}/v1/status")
        finally:
            await runner.cleanup()
        return before, after

    before, after = asyncio.run(main())
    assert (before["model"], before["mode"]) == (MODEL, "disaggregated")
    assert before["slo"] == {"ttft_ms": 1000.0, "tpot_ms": 500.0}
    assert before["workers"][2] == {
        "name": "decode-1", "pool": "decode", "live": False, "incarnation": 1, "running": 0,
        "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 1024,
    }  # fmt: skip
    assert [w["name"] for w in before["workers"]] == ["prefill-0", "decode-0", "decode-1"]
    assert before["pools"][1] == {
        "name": "decode", "workers_live": 1, "workers_total": 2, "running": 3, "waiting": 0,
        "kv_blocks_used": 40, "kv_blocks_total": 2048,
    }  # fmt: skip
    assert before["kv_transfer"]["bytes_total"] == 4096
    assert before["kv_transfer"]["backends"] == ["nixl"]
    assert before["recent_requests"] == [{
        "id": "cmpl-1", "retries": 1, "migrations": 0, "finish_reason": None,
        "phases": [{"name": "prefill", "start_s": 0.0, "end_s": 0.2},
                   {"name": "decode", "start_s": 0.25, "end_s": 1.0}],
    }]  # fmt: skip
    assert before["latency_ms"]["ttft"] == {"count": 0, "p50": None, "p90": None, "p99": None}
    assert before["requests"]["finished_in_window"] == 0
    # three requests of 4 tokens: 3 TTFTs, 9 gaps, all within the SLO
    assert after["latency_ms"]["ttft"]["count"] == 3
    assert after["latency_ms"]["itl"]["count"] == 9
    assert 10 <= after["latency_ms"]["itl"]["p50"] < 1000
    assert after["requests"]["finished_in_window"] == 3
    assert after["requests"]["admitted_per_s"] > 0
    assert after["requests"]["goodput_per_s"] == after["requests"]["finished_per_s"] > 0
    assert (after["requests"]["running"], after["requests"]["waiting"]) == (3, 2)
    assert after["requests"]["in_flight"] == 0
    assert after["kv_transfer"]["bytes_per_s"] == 0.0  # two readings, no growth


def test_status_survives_an_engine_without_stats():
    class Broken(ScriptedEngine):
        async def stats(self) -> EngineStats:
            raise RuntimeError("no stats")

    async def main():
        async with running_server(make_config(), Broken(), TOK) as url:
            async with aiohttp.ClientSession() as s:
                return await _get(s, f"{url}/v1/status")

    status, _, body = asyncio.run(main())
    assert status == 200 and body["engine_error"] == "engine stats unavailable: RuntimeError"
    assert body["workers"] == [] and body["recent_requests"] == []


@pytest.mark.parametrize("api_key", [None, "sekret"])
def test_page_is_public_status_json_needs_the_key(api_key):
    async def main():
        async with running_server(make_config(api_key=api_key), ScriptedEngine(), TOK) as url:
            async with aiohttp.ClientSession() as s:
                pages = []
                for path in ("/", "/status", "/static/status.js", "/static/status.css"):
                    async with s.get(url + path) as r:
                        pages.append((r.status, r.content_type, await r.text()))
                bare = await _get(s, f"{url}/v1/status")
                auth = {"Authorization": f"Bearer {api_key}"}
                keyed = await _get(s, f"{url}/v1/status", headers=auth)
                missing = await _get(s, f"{url}/static/other.js")
        return pages, bare, keyed, missing

    pages, bare, keyed, missing = asyncio.run(main())
    assert [p[:2] for p in pages] == [(200, "text/html"), (200, "text/html"),
                                      (200, "text/javascript"), (200, "text/css")]  # fmt: skip
    html = pages[0][2]
    assert f'data-auth="{"required" if api_key else "none"}"' in html
    assert not any("://" in text for _, _, text in pages)  # no asset from anywhere else
    assert bare[0] == (401 if api_key else 200)
    assert keyed[0] == 200 and keyed[2]["model"] == MODEL
    assert missing[0] == 404


def test_every_response_has_an_x_request_id():
    engine = ScriptedEngine()

    async def main():
        config = make_config(api_key="k", max_queued_requests=1)
        async with running_server(config, engine, TOK) as url:
            auth = {"Authorization": "Bearer k"}
            body = {"model": MODEL, "prompt": "ab", "max_tokens": 3}
            async with aiohttp.ClientSession() as s:
                seen = {}
                async with s.post(f"{url}/v1/completions", json=body, headers=auth) as r:
                    seen["completion"] = (r.headers["x-request-id"], (await r.json())["id"])
                stream = {"model": MODEL, "max_tokens": 3, "stream": True}  # (no prompt: chat)
                async with s.post(f"{url}/v1/chat/completions", headers=auth, json={
                        **stream, "messages": [{"role": "user", "content": "hi"}]}) as r:
                    first = (await r.content.readuntil(b"\n\n")).decode()
                    seen["stream"] = (r.headers["x-request-id"], first)
                    await r.read()
                for name, path in (("health", "/health"), ("page", "/"), ("404", "/nope"),
                                   ("401", "/v1/models")):  # fmt: skip
                    async with s.get(url + path) as r:
                        seen[name] = (r.status, r.headers.get("x-request-id"))
                async with s.post(f"{url}/v1/completions", json={"model": MODEL},
                                  headers=auth) as r:  # fmt: skip
                    seen["400"] = (r.status, r.headers.get("x-request-id"))
        return seen

    seen = asyncio.run(main())
    rid, body_id = seen["completion"]
    assert rid == body_id and rid.startswith("cmpl-")
    rid, first_event = seen["stream"]
    assert rid.startswith("chatcmpl-") and f'"id":"{rid}"' in first_event
    assert seen["health"][0] == 200 and seen["404"][0] == 404 and seen["401"][0] == 401
    assert seen["400"][0] == 400
    ids = [seen[k][1] for k in ("health", "page", "404", "401", "400")]
    assert all(ids) and len(set(ids)) == len(ids)
    assert all(i.startswith(("req-", "cmpl-")) for i in ids)
