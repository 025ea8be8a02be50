"""One request's trip through the engine, as the front end sees it.

``RequestRun`` wraps ``EngineClient.generate``: it enforces the request deadline, observes TTFT,
inter-token latency and whether the request met ``coordinator.slo`` (goodput), and guarantees
the invariant the engine relies on to free KV blocks:

    every run that does not end with a finished delta ends with ``engine.abort(request_id)``

(client disconnect, timeout, engine error, handler cancelled). Callers must ``await close()`` in
a ``finally``; it is idempotent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable

from coordinator.engine_client import EngineClient
from coordinator.metrics import ServerMetrics
from core.outputs import FINISH_LENGTH, FINISH_STOP, OutputDelta
from core.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestTimeout(Exception):
    pass


class RequestRun:
    def __init__(
        self,
        engine: EngineClient,
        metrics: ServerMetrics,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: float,
        timeout_s: float,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        """``on_finished``: called once the finished delta is produced, before it is handed on
        (so before the client can see the end of the response)."""
        self.engine = engine
        self.metrics = metrics
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival = arrival  # time.monotonic() when the HTTP request arrived
        self.deadline = arrival + timeout_s
        self.finished = False
        self._on_finished = on_finished
        self._stream: AsyncIterator[OutputDelta] | None = None
        self._first_token_time: float | None = None
        self._last_token_time: float | None = None
        self._num_tokens = 0
        self._closed = False
        metrics.observe_admitted()

    def __aiter__(self) -> RequestRun:
        return self

    async def __anext__(self) -> OutputDelta:
        if self.finished or self._closed:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        # Deadline per step rather than around the whole loop: the consumer writes to the socket
        # between steps, and a timeout must never fire inside the consumer's code.
        remaining = self.deadline - time.monotonic()
        try:
            async with asyncio.timeout_at(loop.time() + max(remaining, 0.0)):
                if self._stream is None:
                    stream = self.engine.generate(
                        self.request_id, self.prompt_token_ids, self.params
                    )
                    self._stream = await stream if inspect.isawaitable(stream) else stream
                delta = await anext(self._stream)
        except TimeoutError:
            raise RequestTimeout(
                f"request {self.request_id} timed out after {self.deadline - self.arrival:.1f}s"
            ) from None
        except StopAsyncIteration:
            # An engine that ends a stream without a finished delta broke its contract; make
            # sure its blocks are released anyway (close() aborts because finished is False).
            log.warning("engine stream for %s ended without finish_reason", self.request_id)
            raise
        self._observe(delta)
        if delta.finished:
            self.finished = True
            self._observe_finish(delta)
            if self._on_finished is not None:
                self._on_finished()
        return delta

    def _observe(self, delta: OutputDelta) -> None:
        num_tokens = len(delta.token_ids)
        if num_tokens == 0:
            return
        now = time.monotonic()
        if self._last_token_time is None:
            # Gaps inside the first delta are unknown (tokens arrived together): TTFT only.
            self._first_token_time = now
            self.metrics.observe_first_token(now - self.arrival)
        else:
            gap = (now - self._last_token_time) / num_tokens
            self.metrics.observe_token_gaps(gap, num_tokens)
        self._last_token_time = now
        self._num_tokens += num_tokens

    def _observe_finish(self, delta: OutputDelta) -> None:
        ttft, tpot = None, 0.0
        if self._first_token_time is not None and self._last_token_time is not None:
            ttft = self._first_token_time - self.arrival
            if self._num_tokens > 1:  # vLLM's TPOT: time after token 1 / tokens after it
                span = self._last_token_time - self._first_token_time
                tpot = span / (self._num_tokens - 1)
        completed = delta.finish_reason in (FINISH_STOP, FINISH_LENGTH) and delta.error is None
        self.metrics.observe_finish(time.monotonic() - self.arrival, ttft, tpot, completed)

    async def close(self) -> None:
        """Abort (unless finished) and close the engine's stream, in a task of its own: the
        handler running this may be cancelled again meanwhile (a client that leaves while its
        request is being wound down), and that must not cut the cleanup short."""
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(asyncio.ensure_future(self._wind_down()))

    async def _wind_down(self) -> None:
        if not self.finished:
            try:
                await self.engine.abort(self.request_id)
            except Exception:
                log.exception("abort of %s failed", self.request_id)
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.exception("closing the engine stream of %s failed", self.request_id)
