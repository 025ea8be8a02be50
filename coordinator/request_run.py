"""One request's trip through the engine, as the front end sees it: its ``n`` choices.

``RequestRun`` wraps ``EngineClient.generate``, one engine request per choice: choice 0 is known
by the request id itself, choice i > 0 by ``<request id>+<i>`` (``choice_id``; ``+`` occurs
neither in a client's x-request-id nor in a generated id, so choice ids never clash with another
request's). Iterating yields ``(choice index, delta)``. It enforces the request deadline,
observes TTFT, inter-token latency and whether the request met ``coordinator.slo`` (goodput,
once per request: every choice must), and guarantees the invariant the engine relies on to
free KV blocks:

    every choice that does not end with a finished delta ends with ``engine.abort(its id)``

(client disconnect, timeout, engine error, a sibling choice failed, handler cancelled). Callers
must ``await close()`` in a ``finally``; it is idempotent.

With n > 1, choice 0's engine request starts first and choices 1.. name it as ``fork_of`` (an
engine may place them over its prompt KV: one prefill and one transfer for all). Their deltas
are held back until choice 0's first delta has been yielded: that one carries what every choice
shares (the prompt's logprobs and cached-token count).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from coordinator.engine_client import EngineClient
from coordinator.metrics import ServerMetrics
from core.outputs import FINISH_LENGTH, FINISH_STOP, OutputDelta
from core.sampling_params import SamplingParams

log = logging.getLogger(__name__)

CHOICE_SEPARATOR = "+"


def choice_id(request_id: str, index: int) -> str:
    """The engine request id of choice ``index`` of ``request_id``."""
    return request_id if index == 0 else f"{request_id}{CHOICE_SEPARATOR}{index}"


class RequestTimeout(Exception):
    pass


@dataclass(eq=False)
class _Choice:
    index: int
    request_id: str
    params: SamplingParams
    stream: AsyncIterator[OutputDelta] | None = None
    pending: asyncio.Future | None = None  # its next delta (n > 1: read concurrently)
    finished: bool = False  # its finished delta arrived
    completed: bool = False  # ... and it ended by stop or length, without error
    yielded: bool = False  # a delta of it was handed out
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_tokens: int = 0


class RequestRun:
    def __init__(
        self,
        engine: EngineClient,
        metrics: ServerMetrics,
        request_id: str,
        prompt_token_ids: list[int],
        params: Sequence[SamplingParams],
        arrival: float,
        timeout_s: float,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        """``params``: one per choice (``len(params)`` is n). ``on_finished``: called once every
        choice's finished delta has arrived, before the last is handed on (so before the client
        can see the end of the response)."""
        if not params:
            raise ValueError("a request has at least one choice")
        self.engine = engine
        self.metrics = metrics
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.arrival = arrival  # time.monotonic() when the HTTP request arrived
        self.deadline = arrival + timeout_s
        self._choices = [_Choice(i, choice_id(request_id, i), p) for i, p in enumerate(params)]
        self._ready: deque[tuple[int, OutputDelta]] = deque()  # to hand out, in order
        self._held: list[tuple[int, OutputDelta]] = []  # choices 1.. before choice 0 spoke
        self._on_finished = on_finished
        self._first_token_time: float | None = None
        self._opened = False
        self._broken = False  # an engine stream ended without its finished delta
        self._closed = False
        self._finish_observed = False
        metrics.observe_admitted()

    @property
    def finished(self) -> bool:
        """Every choice's finished delta has arrived."""
        return all(c.finished for c in self._choices)

    def __aiter__(self) -> RequestRun:
        return self

    async def __anext__(self) -> tuple[int, OutputDelta]:
        loop = asyncio.get_running_loop()
        while not self._ready:
            if self.finished or self._closed or self._broken:
                raise StopAsyncIteration
            # Deadline per step rather than around the whole loop: the consumer writes to the
            # socket between steps, and a timeout must never fire inside the consumer's code.
            remaining = self.deadline - time.monotonic()
            try:
                async with asyncio.timeout_at(loop.time() + max(remaining, 0.0)):
                    choice, delta = await self._next_delta()
            except TimeoutError:
                raise RequestTimeout(
                    f"request {self.request_id} timed out after {self.deadline - self.arrival:.1f}s"
                ) from None
            if delta is None:
                # An engine that ends a stream without a finished delta broke its contract; make
                # sure its blocks are released anyway (close() aborts the unfinished choices).
                log.warning("engine stream for %s ended without finish_reason", choice.request_id)
                self._broken = True
                raise StopAsyncIteration
            self._observe(choice, delta)
            self._queue(choice, delta)
            if self.finished and self._on_finished is not None:
                on_finished, self._on_finished = self._on_finished, None
                on_finished()
        index, delta = self._ready.popleft()
        self._choices[index].yielded = True
        return index, delta

    # ---- reading the engine's streams ------------------------------------------------------
    async def _open(self) -> None:
        """Start every choice's engine request, choice 0 first (choices 1.. name it as their
        ``fork_of``; an async-generator engine runs their bodies in the order first read)."""
        self._opened = True
        for c in self._choices:
            if c.index == 0:
                stream = self.engine.generate(c.request_id, self.prompt_token_ids, c.params)
            else:
                stream = self.engine.generate(c.request_id, self.prompt_token_ids, c.params,
                                              fork_of=self.request_id)  # fmt: skip
            c.stream = await stream if inspect.isawaitable(stream) else stream

    async def _next_delta(self) -> tuple[_Choice, OutputDelta | None]:
        """The next delta of any unfinished choice (None: its stream ended without finishing)."""
        if not self._opened:
            await self._open()
        live = [c for c in self._choices if not c.finished]
        if len(self._choices) == 1:  # one choice: read it directly, no task in between
            return live[0], await anext(live[0].stream, None)
        for c in live:  # in index order: choice 0's engine request starts first
            if c.pending is None:
                c.pending = asyncio.ensure_future(anext(c.stream, None))
        await asyncio.wait([c.pending for c in live], return_when=asyncio.FIRST_COMPLETED)
        choice = next(c for c in live if c.pending.done())
        pending, choice.pending = choice.pending, None
        return choice, pending.result()

    def _queue(self, choice: _Choice, delta: OutputDelta) -> None:
        if choice.index > 0 and not self._choices[0].yielded and not self._choice0_queued():
            self._held.append((choice.index, delta))
            return
        self._ready.append((choice.index, delta))
        if choice.index == 0 and self._held:
            self._ready.extend(self._held)
            self._held.clear()

    def _choice0_queued(self) -> bool:
        return any(index == 0 for index, _ in self._ready)

    # ---- metrics ---------------------------------------------------------------------------
    def _observe(self, choice: _Choice, delta: OutputDelta) -> None:
        num_tokens = len(delta.token_ids)
        if num_tokens:
            now = time.monotonic()
            if self._first_token_time is None:  # the request's TTFT: its first token of any
                self._first_token_time = now
                self.metrics.observe_first_token(now - self.arrival)
            if choice.last_token_time is None:
                # Gaps inside the first delta are unknown (tokens arrived together).
                choice.first_token_time = now
            else:
                gap = (now - choice.last_token_time) / num_tokens
                self.metrics.observe_token_gaps(gap, num_tokens)
            choice.last_token_time = now
            choice.num_tokens += num_tokens
        if delta.finished:
            choice.finished = True
            choice.completed = (delta.finish_reason in (FINISH_STOP, FINISH_LENGTH)
                                and delta.error is None)  # fmt: skip
            if self.finished or not choice.completed:  # a failed choice ends the request
                self._observe_finish()

    def _observe_finish(self) -> None:
        if self._finish_observed:
            return
        self._finish_observed = True
        ttft = None
        if self._first_token_time is not None:
            ttft = self._first_token_time - self.arrival
        tpot = 0.0  # vLLM's TPOT per choice (time after token 1 / tokens after it); the worst
        for c in self._choices:
            if c.first_token_time is not None and c.last_token_time is not None:
                if c.num_tokens > 1:
                    span = c.last_token_time - c.first_token_time
                    tpot = max(tpot, span / (c.num_tokens - 1))
        completed = all(c.completed for c in self._choices)
        self.metrics.observe_finish(time.monotonic() - self.arrival, ttft, tpot, completed)

    # ---- the end ---------------------------------------------------------------------------
    async def close(self) -> None:
        """Abort every unfinished choice and close the engine's streams, in a task of its own:
        the handler running this may be cancelled again meanwhile (a client that leaves while
        its request is being wound down), and that must not cut the cleanup short."""
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(asyncio.ensure_future(self._wind_down()))

    async def _wind_down(self) -> None:
        unfinished = [c for c in self._choices if not c.finished]
        results = await asyncio.gather(
            *(self.engine.abort(c.request_id) for c in unfinished), return_exceptions=True
        )
        for c, result in zip(unfinished, results, strict=True):
            if isinstance(result, BaseException):
                log.error("abort of %s failed: %r", c.request_id, result)
        for c in self._choices:
            if c.pending is not None and not c.pending.done():
                c.pending.cancel()  # its engine generator ends (and cleans up) with it
                await asyncio.wait([c.pending])
            if c.pending is not None and not c.pending.cancelled():
                c.pending.exception()  # retrieved: asyncio must not log it as lost
            aclose = getattr(c.stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing the engine stream of %s failed", c.request_id)
