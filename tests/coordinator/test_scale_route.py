"""``POST /admin/pools/{pool}/replicas``: a valid target reaches the engine's ``scale`` and is
answered 202 with the pool's counts; a bad count, an unknown pool, an engine that cannot scale and
a missing API key are refused with OpenAI-style errors naming what is wrong."""

from __future__ import annotations

import asyncio

import aiohttp
from engine_double import ScriptedEngine
from serving_harness import make_config, running_server
from tokenizer_double import ByteTokenizer

from coordinator.engine_client import PoolHealth


class ScalingEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[tuple[str, int]] = []

    async def scale(self, pool: str, replicas: int) -> PoolHealth:
        self.targets.append((pool, replicas))
        return PoolHealth(live=2, target=replicas)


def post_all(engine, bodies, api_key=None, headers=None) -> list[tuple[int, dict]]:
    async def main():
        config = make_config(api_key=api_key) if api_key else make_config()
        async with running_server(config, engine, ByteTokenizer()) as url:
            async with aiohttp.ClientSession() as session:
                out = []
                for pool, body in bodies:
                    async with session.post(f"{url}/admin/pools/{pool}/replicas", json=body,
                                            headers=headers or {}) as r:  # fmt: skip
                        out.append((r.status, await r.json()))
                return out

    return asyncio.run(main())


def test_a_valid_target_is_forwarded_and_answered_202():
    engine = ScalingEngine()
    [(status, body)] = post_all(engine, [("decode", {"replicas": 3})])
    assert (status, body) == (202, {"pool": "decode", "target": 3, "live": 2})
    assert engine.targets == [("decode", 3)]


def test_bad_requests_name_what_is_wrong():
    engine = ScalingEngine()
    answers = post_all(engine, [("decode", {"replicas": 0}), ("decode", {"replicas": True}),
                                ("decode", {"replicas": "2"}), ("decode", {}),
                                ("nope", {"replicas": 2})])  # fmt: skip
    assert [s for s, _ in answers] == [400, 400, 400, 400, 404]
    assert [b["error"]["param"] for _, b in answers] == ["replicas"] * 4 + ["pool"]
    assert "prefill, decode" in answers[-1][1]["error"]["message"]
    assert engine.targets == []


def test_an_engine_that_cannot_scale_and_the_api_key():
    [(status, body)] = post_all(ScriptedEngine(), [("decode", {"replicas": 2})])
    assert (status, body["error"]["code"]) == (404, "not_supported")
    engine = ScalingEngine()
    [(status, _)] = post_all(engine, [("decode", {"replicas": 2})], api_key="k")
    assert status == 401 and engine.targets == []
    auth = {"Authorization": "Bearer k"}
    [(status, _)] = post_all(engine, [("decode", {"replicas": 2})], api_key="k", headers=auth)
    assert status == 202 and engine.targets == [("decode", 2)]
