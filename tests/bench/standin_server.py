"""A tiny OpenAI-compatible streaming server whose token timestamps are known: request k (in
arrival order) waits ``ttft_s`` before its first token chunk, then each of ``gaps_s`` before the
next. It runs on its own thread and event loop, so ``tandem bench`` (which runs its own loop)
can be called from the test's thread."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Schedule:
    ttft_s: float
    gaps_s: tuple[float, ...]

    @property
    def num_tokens(self) -> int:
        return 1 + len(self.gaps_s)


class StandInServer:
    def __init__(self, schedules: list[Schedule], send_usage: bool = True) -> None:
        self.schedules = schedules
        self.send_usage = send_usage
        self.bodies: list[dict] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        schedule = self.schedules[len(self.bodies) % len(self.schedules)]
        self.bodies.append(body)
        chat = request.path.endswith("/chat/completions")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(text: str) -> dict:
            choice = {"index": 0, **({"delta": {"content": text}} if chat else {"text": text})}
            return {"id": "x", "choices": [choice], "usage": None}

        if chat:  # the opening role chunk, at once: not a token
            await send({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                     "content": ""}}]})  # fmt: skip
        await asyncio.sleep(schedule.ttft_s)
        await send(chunk("t0"))
        for i, gap in enumerate(schedule.gaps_s):
            await asyncio.sleep(gap)
            await send(chunk(f" t{i + 1}"))
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            prompt = body.get("prompt") or body.get("messages")
            usage = {"prompt_tokens": len(prompt), "completion_tokens": schedule.num_tokens}
            await send({"id": "x", "choices": [], "usage": usage})
        await send("[DONE]")
        return response

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stand-in"}]})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self._stream)
        app.router.add_post("/v1/chat/completions", self._stream)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> StandInServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
