"""Start a real aiohttp server (the production ``start_server``) on a free port for one test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from coordinator.engine_client import EngineClient, Tokenizer
from coordinator.server import bound_port, build_app, start_server
from core.config import TandemConfig, parse_config

MODEL = "tiny-test-model"


def make_config(
    mode: str = "disaggregated", max_model_len: int = 256, **coordinator
) -> TandemConfig:
    pool = {"kv_cache": {"num_blocks": 64, "block_size": 16}}
    pools = {"colocated": pool} if mode == "colocated" else {"prefill": pool, "decode": pool}
    return parse_config(
        {
            "mode": mode,
            "model": {"name": MODEL, "max_model_len": max_model_len},
            "pools": pools,
            "coordinator": {"host": "127.0.0.1", "port": 0, **coordinator},
        }
    )


@contextlib.asynccontextmanager
async def running_server(
    config: TandemConfig, engine: EngineClient, tokenizer: Tokenizer
) -> AsyncIterator[str]:
    runner = await start_server(build_app(config, engine, tokenizer), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until true; cross-task effects (aborts) land asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
