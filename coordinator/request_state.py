"""Where each in-flight request is: its attempts, and which worker incarnation holds what for it.

The coordinator owns every request's progress. It places a request one *attempt* at a time; each
attempt has its own wire id (``<request id>~<n>``), the id its workers and the token stream know,
so that nothing a failed attempt's workers still send can reach the next one. Attempt n > 0
resumes the request: ``resume_token_ids`` are the tokens already streamed to the client, which
its workers prefill after the prompt, so its first token is the one an undisturbed run would
have produced next (the seeded RNG is keyed by output position: sampling continues too).

One attempt, remote prefill (``local_on`` is None, disaggregated)::

    QUEUED ──reserve on decode──> (decode holds blocks) ──prefill──> PREFILLING
        ──its 1st token (from prefill)──> TRANSFERRING ──2nd (from decode)──> DECODING ──> DONE

Local prefill (colocated, or on a decode worker: ``recompute``, ``n_fork``, a short prompt ...):
QUEUED ──add_request──> PREFILLING ──1st token──> DECODING ──> DONE.

Holders: the serving (decode or colocated) worker from its call until the attempt is DONE; the
prefill worker from ``prefill`` until decode took over (DECODING). ``end_calls`` says what each
holder must be told when the attempt ends. Actor calls still in flight (``pending``) are awaited
before those: calls to a threaded actor may run out of order, so an abort could otherwise overtake
the reserve it is meant to undo.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.worker_pool import WorkerRef
from core.outputs import OutputDelta
from core.sampling_params import SamplingParams


class Phase(StrEnum):
    QUEUED = "queued"  # being placed
    PREFILLING = "prefilling"  # a worker computes the prompt; no token of this attempt yet
    TRANSFERRING = "transferring"  # prefill sent its token; the KV is on its way to decode
    DECODING = "decoding"  # the serving worker generates
    DONE = "done"


@dataclass(eq=False)
class Attempt:
    number: int
    wire_id: str
    resume_token_ids: tuple[int, ...]  # output tokens streamed before this attempt
    local_on: WorkerRef | None = None  # prefill on this serving worker itself (recompute)
    # why its prompt was prefilled on its serving worker (None: remote): recompute, n_fork (a
    # choice of an n > 1 request, over the prompt blocks choice 0 brought there), short ...
    local_why: str | None = None
    phase: Phase = Phase.QUEUED
    decode: WorkerRef | None = None  # the serving worker (decode or colocated)
    prefill: WorkerRef | None = None  # remote prefill only
    prefill_asked: bool = False  # the prefill call went out: KV may be written into decode
    # prefill sends layer groups while it computes: KV may be in flight even when prefill's
    # token ended the request (its last group then tells decode to discard)
    overlapped: bool = False
    num_tokens: int = 0  # tokens of this attempt handed on
    num_queued_tokens: int = 0  # counted in its prefill worker's queue estimate until token 1
    pending: list[asyncio.Future] = field(default_factory=list)  # actor calls not answered yet
    cleanup: asyncio.Task | None = None  # the one end-of-attempt task
    num_blocks: int = 0  # KV blocks reserved on decode for it (remote)
    num_cached_blocks: int = 0  # of those, already holding their KV there (not transferred)
    # seconds since the request arrived (the trace): placement began / done, its first token,
    # decode's first token (remote), its end; and why it failed, if it did
    started_s: float = 0.0
    placed_s: float | None = None
    first_token_s: float | None = None
    decode_s: float | None = None
    ended_s: float | None = None
    failure: tuple[str, str, str] | None = None  # (stage, fault, message)
    next_action: str | None = None  # what followed a failure: retry, recompute or fail

    @property
    def remote(self) -> bool:
        return self.prefill is not None

    @property
    def stage(self) -> str:
        """Where the attempt was (for retry metrics): queued, prefill, transfer or decode."""
        if self.phase == Phase.QUEUED:
            return "queued"
        if self.phase == Phase.PREFILLING:
            return "prefill"
        return "transfer" if self.phase == Phase.TRANSFERRING else "decode"

    def holds(self, worker: WorkerRef) -> bool:
        """Does ``worker`` (this incarnation) hold state of this attempt right now?"""
        if self.phase == Phase.DONE:
            return False
        prefill_holds = self.phase in (Phase.QUEUED, Phase.PREFILLING, Phase.TRANSFERRING)
        return worker is self.decode or (prefill_holds and worker is self.prefill)

    def observe(self, num_tokens: int, now_s: float) -> None:
        """``num_tokens`` more tokens of this attempt were handed on (deltas arrive in order),
        ``now_s`` after the request arrived."""
        if num_tokens == 0:
            return
        before, self.num_tokens = self.num_tokens, self.num_tokens + num_tokens
        if before == 0:
            self.first_token_s = now_s
        if self.remote and before == 0 and num_tokens == 1:
            self.phase = Phase.TRANSFERRING  # prefill's token; decode's come next
        else:
            if self.phase == Phase.TRANSFERRING:
                self.decode_s = now_s
            self.phase = Phase.DECODING

    def finisher(self, num_tokens: int) -> WorkerRef | None:
        """Who sent a delta of ``num_tokens`` that ended the request on its own (stop/length)."""
        if self.remote and self.num_tokens == num_tokens:  # the attempt's first token: prefill
            return self.prefill
        return self.decode

    def end_calls(self, finished_by: WorkerRef | None) -> list[tuple[WorkerRef, str]]:
        """(worker, method) to end this attempt on every live holder but ``finished_by`` (the
        worker that ended it itself; None when the coordinator or a failure ended it).

        A decode reservation is ``release``d (freed at once) when no KV is or will be in flight
        into it: prefill never asked, ended by prefill at its token (unless it sends layer
        groups while computing), or its prefill worker's process is gone. Otherwise ``abort``,
        which quarantines a reservation until its WRITE lands or times out.
        """
        calls = []
        p, d = self.prefill, self.decode
        prefill_holds = p is not None and self.phase in (Phase.PREFILLING, Phase.TRANSFERRING)
        if prefill_holds and p.alive and p is not finished_by:
            calls.append((p, "abort"))
        if d is not None and d.alive and d is not finished_by:
            ended_by_prefill = p is finished_by and not self.overlapped
            writer_gone = p is None or not self.prefill_asked or ended_by_prefill
            writer_gone = writer_gone or (not p.alive and p.death == "worker_died")
            in_flight = prefill_holds and not writer_gone
            calls.append((d, "abort" if in_flight else "release"))
        return calls


@dataclass(eq=False)
class RequestRecord:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    arrival_wall: float = field(default_factory=time.time)
    attempts: list[Attempt] = field(default_factory=list)
    num_failed: int = 0  # attempts that failed and count against coordinator.retry.max_attempts
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (seconds, name, detail)
    num_output_tokens: int = 0
    finish_reason: str | None = None  # None: still running
    error: str | None = None
    ended_s: float | None = None
    # where this request's prompt KV sits in a serving worker's prefix cache: set (and
    # ``kv_ready`` with it) once an attempt's serving worker decodes, or when the request ends
    # (``kv_on`` then stays None if none did); choices 1.. of an n > 1 request wait for it
    kv_on: WorkerRef | None = None
    kv_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def attempt(self) -> Attempt:
        return self.attempts[-1]

    def new_attempt(
        self,
        resume_token_ids: tuple[int, ...],
        local_on: WorkerRef | None = None,
        local_why: str = "recompute",
    ) -> Attempt:
        """``local_on``: prefill on this serving worker itself, for ``local_why``."""
        n = len(self.attempts)
        attempt = Attempt(n, f"{self.request_id}~{n}", resume_token_ids, local_on,
                          local_why if local_on is not None else None,
                          started_s=self.elapsed() if n else 0.0)  # fmt: skip
        self.attempts.append(attempt)
        return attempt

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return time.monotonic() - self.arrival

    def params_for(self, attempt: Attempt) -> SamplingParams:
        """Prompt logprobs go out with the first token only: a resumed attempt skips them."""
        if attempt.resume_token_ids and self.params.prompt_logprobs is not None:
            return SamplingParams.from_dict({**self.params.to_dict(), "prompt_logprobs": None})
        return self.params

    def note_output(self, out: OutputDelta) -> None:
        """A delta handed to the client: its counts (and, if it is the last, how it ended)."""
        self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error

    def trace(self, name: str, detail: str = "") -> None:
        self.events.append((self.elapsed(), name, detail))
