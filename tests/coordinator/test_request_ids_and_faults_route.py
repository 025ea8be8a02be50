"""``x-request-id``: echoed (the client's, or a new one) on every response and used as the
request's id; a bad or in-flight one is a 400. ``POST /admin/faults`` exists only when fault
injection was allowed at start, and sits behind the API key."""

from __future__ import annotations

import asyncio

import aiohttp
from engine_double import ScriptedEngine
from serving_harness import MODEL, make_config, running_server, wait_for
from tokenizer_double import ByteTokenizer

TOK = ByteTokenizer()
BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 3}


def test_request_ids_are_echoed_used_and_checked():
    engine = ScriptedEngine(token_delay_s=0.05)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                post = f"{url}/v1/completions"
                async with session.post(post, json=BODY, headers={"x-request-id": "a-1"}) as r:
                    mine = (r.headers["x-request-id"], (await r.json())["id"])
                stream = {**BODY, "stream": True}
                async with session.post(post, json=stream, headers={"x-request-id": "s.2"}) as r:
                    streamed = r.headers["x-request-id"]
                    await r.read()
                async with session.get(f"{url}/v1/models") as r:
                    made = r.headers["x-request-id"]
                spaced = {"x-request-id": "no spaces"}
                async with session.post(post, json=BODY, headers=spaced) as r:
                    bad = (r.status, (await r.json())["error"]["param"])
                slow = {**BODY, "max_tokens": 40}
                first = asyncio.ensure_future(session.post(post, json=slow,
                                                           headers={"x-request-id": "dup"}))
                await wait_for(lambda: len(engine.requests) == 3)
                async with session.post(post, json=BODY, headers={"x-request-id": "dup"}) as r:
                    dup = (r.status, (await r.json())["error"]["message"])
                (await first).close()
                return mine, streamed, made, bad, dup

    mine, streamed, made, bad, dup = asyncio.run(main())
    assert mine == ("a-1", "cmpl-a-1")
    assert engine.requests[0][0] == "cmpl-a-1"  # the engine knows it by that id
    assert streamed == "s.2"
    assert made.startswith("req-") and len(made) == 36  # a fresh one
    assert bad == (400, "x-request-id")
    assert dup[0] == 400 and "in flight" in dup[1]


def test_admin_faults_only_with_fault_injection_and_the_key(monkeypatch):
    async def post(url: str, headers: dict | None = None) -> int:
        async with aiohttp.ClientSession() as session:
            body = {"worker": "decode-0", "point": "step", "action": "raise"}
            async with session.post(f"{url}/admin/faults", json=body, headers=headers) as r:
                return r.status

    async def main(api_key: str | None = None) -> tuple[int, ...]:
        config = make_config(api_key=api_key) if api_key else make_config()
        async with running_server(config, ScriptedEngine(), TOK) as url:
            return await post(url), await post(url, {"Authorization": "Bearer k"})

    monkeypatch.delenv("TANDEM_FAULT_INJECTION", raising=False)
    assert asyncio.run(main()) == (404, 404)  # normal serving: no such route
    monkeypatch.setenv("TANDEM_FAULT_INJECTION", "1")
    # the engine double has no fault injection: the route exists, and says so
    assert asyncio.run(main(api_key="k")) == (401, 404)
