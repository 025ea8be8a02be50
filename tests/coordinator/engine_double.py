"""A deterministic engine: a test double of the ``EngineClient`` boundary for front-end tests.

It generates lowercase letters determined by the prompt (``expected_ids``), honours max_tokens
(finish "length") and, when ``eos_after`` is set, an end-of-sequence after that many tokens
(finish "stop") unless ``ignore_eos``, never before ``min_tokens``. Stop strings are the real
engine's job and are not imitated. It records every request and every abort, and an aborted
request stops generating, as a real one does when its blocks are freed. Like a worker, its first
delta carries the prompt logprobs (``expected_prompt_logprob``) and ``cached_tokens``; with
``reject_structured`` set, a request with structured output ends ``rejected`` with that message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from coordinator.engine_client import EngineStats, PoolHealth
from core.outputs import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_REJECTED,
    FINISH_STOP,
    OutputDelta,
    TokenLogprob,
)
from core.sampling_params import SamplingParams


def expected_ids(prompt_token_ids: list[int], num_tokens: int) -> list[int]:
    """The tokens the double generates for a prompt: letters a..z, seeded by the prompt."""
    seed = sum(prompt_token_ids)
    return [ord("a") + (seed + 7 * i) % 26 for i in range(num_tokens)]


def expected_logprob(index: int, rank: int = 0) -> float:
    return -0.125 * (index + 1) - rank


def expected_prompt_logprob(position: int, rank: int = 0) -> float:
    return -0.5 * position - rank


def _entry(token: int, k: int, logprob, index: int) -> TokenLogprob:
    """``logprob(index, rank)``; k alternatives: the token itself first, then "B", "C", ..."""
    top = tuple((token if r == 0 else ord("A") + r, logprob(index, r)) for r in range(k))
    return TokenLogprob(token, logprob(index), top)


@dataclass
class ScriptedEngine:
    token_delay_s: float = 0.0  # sleep before each delta (slow engines: timeouts, disconnects)
    tokens_per_delta: int = 1
    eos_after: int | None = None
    fail_after: int | None = None  # send an error delta after this many tokens
    vanish_after: int | None = None  # end the stream without a finish (a broken engine)
    cached_tokens: int = 0  # prefix-cache hit reported with token 1
    stop_reason: int | str | None = None  # reported on a "stop" finish (eos_after)
    reject_structured: str | None = None  # structured output: end "rejected" with this
    wind_down_s: float = 0.0  # closing a stream takes this long (the Ray client's end calls)
    live: dict[str, PoolHealth] = field(
        default_factory=lambda: {"prefill": PoolHealth(1, 1), "decode": PoolHealth(1, 1)}
    )
    snapshot: EngineStats = field(default_factory=EngineStats)
    requests: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    forks: dict[str, str] = field(default_factory=dict)  # request id -> its fork_of
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fork_of: str | None = None,
    ) -> AsyncIterator[OutputDelta]:
        self.requests.append((request_id, list(prompt_token_ids), params))
        if fork_of is not None:
            self.forks[request_id] = fork_of
        self.started.set()
        try:
            async for delta in self._deltas(request_id, prompt_token_ids, params):
                yield delta
        finally:
            if self.wind_down_s:
                await asyncio.sleep(self.wind_down_s)

    async def _deltas(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[OutputDelta]:
        ids = expected_ids(prompt_token_ids, params.max_tokens)
        num_sent = 0
        if self.reject_structured is not None and params.structured is not None:
            yield OutputDelta(request_id, (), finish_reason=FINISH_REJECTED,
                              error=self.reject_structured)  # fmt: skip
            return
        while num_sent < len(ids):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            if request_id in self.aborted:
                return
            if self.vanish_after is not None and num_sent >= self.vanish_after:
                return
            if self.fail_after is not None and num_sent >= self.fail_after:
                yield OutputDelta(request_id, (), finish_reason=FINISH_ERROR, error="worker died")
                return
            batch = ids[num_sent : num_sent + self.tokens_per_delta]
            start, num_sent = num_sent, num_sent + len(batch)
            finish = FINISH_LENGTH if num_sent == len(ids) else None
            eos_allowed = not params.ignore_eos and num_sent >= params.min_tokens
            if self.eos_after is not None and eos_allowed and num_sent >= self.eos_after:
                finish = FINISH_STOP
            logprobs = ()
            if params.logprobs is not None:
                logprobs = tuple(
                    _entry(tok, params.logprobs, expected_logprob, start + j)
                    for j, tok in enumerate(batch)
                )
            prompt_logprobs = ()
            if start == 0 and params.prompt_logprobs is not None:
                prompt_logprobs = tuple(
                    _entry(tok, params.prompt_logprobs, expected_prompt_logprob, i)
                    for i, tok in enumerate(prompt_token_ids)
                    if i > 0
                )
            yield OutputDelta(
                request_id,
                tuple(batch),
                text=bytes(batch).decode(),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                finish_reason=finish,
                num_prompt_tokens=len(prompt_token_ids),
                num_output_tokens=num_sent,
                stop_reason=self.stop_reason if finish == FINISH_STOP else None,
                num_cached_tokens=self.cached_tokens if start == 0 else 0,
            )
            if finish is not None:
                self.finished.append(request_id)
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def health(self) -> dict[str, PoolHealth]:
        return dict(self.live)

    async def stats(self) -> EngineStats:
        return self.snapshot
