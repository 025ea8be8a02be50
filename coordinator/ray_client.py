"""``EngineClient`` over Ray worker actors (docs/serving.md): requests that survive their workers.

    generate(request):
        loop over attempts (coordinator.retry.max_attempts at most):
            open the attempt's token queue                  (before any worker sees its wire id)
            place it (placement.py): reserve on decode, prefill there; or local prefill
            (choice i > 0 of an n > 1 request: first wait until choice 0's prompt KV is on its
            decode worker, then prefill there locally over those blocks: ``fork_of``)
            tokens <- queue: reorder, detokenize, stop strings (OutputAssembler) -> the client
            a fault (worker died / hung / failed its step, transfer failed or timed out):
                end the attempt on its live holders, then retry_policy.decide:
                retry | recompute (on its decode worker) | fail; a new attempt resumes after
                the tokens already streamed, so none is duplicated, lost or changed
        finally: end the attempt on every holder that did not finish it itself

Faults reach a request as error deltas with ``fault`` set: from its workers (a failed step or
transfer), from here when a holder dies (``_on_death``), or when a prefilled request's decode
worker never takes over within the KV-transfer deadline. Worker stats are polled every
``STATS_INTERVAL_S``; a worker silent or stuck for ``workers.hang_timeout_s``, or reporting
itself unhealthy, is taken out and replaced (supervisor.py). Every ``AUDIT_INTERVAL_S`` the
blocks each worker holds are checked against the attempts that may hold them, and any other are
revoked: no request the coordinator has let go of keeps KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator

from coordinator.engine_client import EngineStats, FaultStats, PoolHealth, RoutingStats
from coordinator.kv_index import KVEventStream, PrefixIndex
from coordinator.output_assembler import OutputAssembler
from coordinator.placement import NoLiveWorker, Placer
from coordinator.request_state import Attempt, Phase, RequestRecord
from coordinator.retry_policy import Failure, decide
from coordinator.supervisor import Supervisor
from coordinator.token_stream import TokenStream
from coordinator.trace import TraceRecorder, TraceSummary, trace_json
from coordinator.worker_pool import WorkerPool, WorkerRef, WorkerUnavailable
from coordinator.worker_watch import WorkerWatch
from core.config import TandemConfig
from core.outputs import (
    FAULT_PLACEMENT,
    FAULT_TRANSFER_TIMEOUT,
    FAULT_WORKER_DIED,
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_REJECTED,
    FINISH_STOP,
    OutputDelta,
)
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # waiting for an in-flight call before ending what it started
HANDOFF_SLACK_S = 5.0  # on top of kv_transfer.timeout_s: decode's first step after the KV lands


class RayEngineClient:
    def __init__(
        self,
        config: TandemConfig,
        pool: WorkerPool,
        supervisor: Supervisor,
        stream: TokenStream,
        tokenizer: Tokenizer,
        events: KVEventStream | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.supervisor = supervisor
        self.stream = stream
        self.events = events  # KV events into the prefix index (None: routing without it)
        self.tokenizer = tokenizer
        self.index = events.index if events is not None else PrefixIndex()
        self.placer = Placer(config, pool, supervisor.recovering, self.index)
        supervisor.in_use = self._in_use
        tracing = config.coordinator.tracing
        self.traces = TraceRecorder(tracing.keep, tracing.log, tracing.otel)
        self.retries: Counter[tuple[str, str]] = Counter()  # (stage, reason) -> new attempts
        self.migrations = 0
        self.watch = WorkerWatch(pool, supervisor, config.coordinator.workers.hang_timeout_s,
                                 self._held, self.placer.room.set)  # fmt: skip
        self._tasks: set[asyncio.Task] = set()
        pool.on_death.append(self._on_death)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.stream.start()
        if self.events is not None:
            self.events.start()
        await self.pool.refresh()
        self.watch.start()

    async def aclose(self) -> None:
        await self.watch.aclose()
        for rec in list(self.records.values()):
            if rec.attempts:
                self.stream.fail(rec.attempt.wire_id, "the server is shutting down")
        self.traces.close()

    @property
    def records(self) -> dict[str, RequestRecord]:
        """The requests in flight, by id."""
        return self.traces.live

    def recent_traces(self, limit: int = 50) -> list[TraceSummary]:
        return self.traces.recent(limit)

    def trace(self, request_id: str) -> dict | None:
        """The whole trace of a request in flight or among the recent ones (None: unknown)."""
        rec = self.traces.get(request_id)
        return None if rec is None else trace_json(rec)

    # ---- EngineClient --------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fork_of: str | None = None,
    ) -> AsyncIterator[OutputDelta]:
        rec = RequestRecord(request_id, tuple(prompt_token_ids), params)
        self.traces.start(rec)
        assembler = OutputAssembler(self.tokenizer, prompt_token_ids, params)
        recompute_on: WorkerRef | None = None
        local_why = "recompute"
        finished_by: WorkerRef | None = None
        try:
            if fork_of is not None:
                recompute_on, local_why = await self._fork_target(rec, fork_of), "n_fork"
            while True:
                attempt = rec.new_attempt(tuple(assembler.token_ids), recompute_on, local_why)
                local_why = "recompute"
                assembler.forget_pending()
                queue = self.stream.open(attempt.wire_id)
                failure = await self._place(rec, attempt)
                if failure is None:
                    attempt.placed_s = rec.elapsed()
                while failure is None and not assembler.finished:
                    delta = await self._next_delta(attempt, queue)
                    if delta.fault is not None:
                        failure = Failure(delta.error or delta.fault, delta.fault)
                        break
                    for out in assembler.push(delta):
                        attempt.observe(len(out.token_ids), rec.elapsed())
                        rec.note_output(out)
                        if attempt.phase == Phase.DECODING and not rec.kv_ready.is_set():
                            # decode stepped: the prompt's full blocks are in its prefix cache
                            rec.kv_on = attempt.decode
                            rec.kv_ready.set()
                        if attempt.num_tokens:  # prefill's compute is over
                            self.placer.prefill_done(attempt)
                        # rejected: a worker refused the grammar before any KV moved
                        if out.finish_reason in (FINISH_STOP, FINISH_LENGTH, FINISH_REJECTED):
                            if not assembler.stopped_here:
                                finished_by = attempt.finisher(len(out.token_ids))
                        yield out
                if failure is None:
                    return
                self.stream.close(attempt.wire_id)
                attempt.failure = (attempt.stage, failure.fault or "", failure.message)
                attempt.ended_s = rec.elapsed()
                self._end_attempt(attempt, None)
                rec.num_failed += failure.counts
                decision = decide(failure, attempt, rec.num_failed,
                                  self.config.coordinator.retry.max_attempts,
                                  self.config.kv_transfer.on_failure)  # fmt: skip
                rec.trace(f"fault:{attempt.stage}", f"{failure.fault}: {failure.message}")
                attempt.next_action = decision.action
                if decision.action == "fail":
                    tries = f" (attempt {rec.num_failed})" if failure.fault else ""
                    out = assembler.fail(failure.message + tries, failure.fault)
                    rec.note_output(out)
                    yield out
                    return
                self.retries[(decision.stage, failure.fault or "")] += 1
                if assembler.token_ids:
                    self.migrations += 1
                recompute_on = attempt.decode if decision.action == "recompute" else None
                rec.trace(decision.action, f"after {len(assembler.token_ids)} tokens")
        finally:
            # in a task of its own: the caller may be cancelled again while this runs (a client
            # that leaves while its request is wound down), which must not cut it short
            stop_string = " (stop string)" if assembler.stopped_here else ""
            ending = asyncio.ensure_future(self._end_request(rec, finished_by, stop_string))
            await asyncio.shield(ending)

    async def _end_request(
        self, rec: RequestRecord, finished_by: WorkerRef | None, stop_string: str
    ) -> None:
        """End the last attempt on its holders, then record how the request ended."""
        attempt = rec.attempts[-1] if rec.attempts else None
        if attempt is not None:
            self.stream.close(attempt.wire_id)
            if attempt.ended_s is None:
                attempt.ended_s = rec.elapsed()
            await self._end_attempt(attempt, finished_by)
        rec.ended_s = rec.elapsed()
        rec.kv_ready.set()  # forks waiting for its prompt KV go ahead (wherever it is)
        rec.finish_reason = rec.finish_reason or FINISH_ABORT  # the client left, or timeout
        rec.trace("finish", rec.finish_reason + stop_string)
        self.traces.finish(rec)

    async def abort(self, request_id: str) -> None:
        rec = self.records.get(request_id)
        if rec is not None and rec.attempts:
            await asyncio.shield(self._end_attempt(rec.attempt, None))

    async def health(self) -> dict[str, PoolHealth]:
        return self.supervisor.health()

    async def stats(self) -> EngineStats:
        attempts = [rec.attempt for rec in self.records.values() if rec.attempts]
        return EngineStats(
            pools=tuple(self.pool.pool_stats(role) for role in self.config.pool_names),
            transfers=self.pool.transfer_totals(),
            num_running=sum(a.phase in (Phase.TRANSFERRING, Phase.DECODING) for a in attempts),
            num_waiting=sum(a.phase in (Phase.QUEUED, Phase.PREFILLING) for a in attempts),
            spec=self.pool.spec_totals(),
            health=self.supervisor.health(),
            workers=self.pool.worker_status(),
            routing=RoutingStats(
                prefill_locations=_rows(self.placer.locations),
                decisions=_rows(self.placer.decisions),
                prefix_hit_tokens=tuple(sorted(self.pool.prefix_hit_tokens().items())),
            ),
            faults=FaultStats(
                retries=tuple((s, r, n) for (s, r), n in sorted(self.retries.items())),
                migrations=self.migrations,
                restarts=tuple(sorted(self.supervisor.restarts.items())),
                leases_revoked=self.watch.leases_revoked,
            ),
        )

    async def scale(self, pool: str, replicas: int) -> PoolHealth:
        """Set a pool's target number of workers (they start or drain in the background)."""
        self.supervisor.scale(pool, replicas)
        return self.supervisor.health()[pool]

    async def arm_fault(self, target: str, fault: dict) -> list[str]:
        """Test-only: arm a fault (engine/faults.py) on a worker, or on every live worker of a
        pool; the names armed."""
        workers = [w for w in self.pool.workers.values() if w.alive and target in (w.name, w.role)]
        if not workers:
            raise KeyError(f"no live worker or pool {target!r}")
        await asyncio.gather(*(self.pool.call(w, "arm_fault", fault) for w in workers))
        return [w.name for w in workers]

    # ---- one attempt -----------------------------------------------------------------------
    async def _place(self, rec: RequestRecord, attempt: Attempt) -> Failure | None:
        try:
            await self.placer.place(rec, attempt)
        except WorkerUnavailable as exc:
            return Failure(str(exc), FAULT_WORKER_DIED, counts=False)
        except NoLiveWorker as exc:
            return Failure(str(exc), None)
        except Exception as exc:  # a worker refused the request (RayTaskError and kin)
            cause = getattr(exc, "cause", None) or exc
            log.warning("placing %s failed: %r", attempt.wire_id, cause)
            return Failure(_short(exc), None if isinstance(cause, ValueError) else FAULT_PLACEMENT)
        self.watch.kick()
        return None

    async def _next_delta(self, attempt: Attempt, queue: asyncio.Queue) -> OutputDelta:
        """The attempt's next delta; a fault if its KV hand-off takes longer than a transfer may
        (token 1 came from prefill, and decode has sent nothing since)."""
        if attempt.phase != Phase.TRANSFERRING:
            return await queue.get()
        timeout = self.config.kv_transfer.timeout_s + HANDOFF_SLACK_S
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            return OutputDelta(attempt.wire_id, (), finish_reason=FINISH_ERROR,
                               error=f"decode worker {attempt.decode.name} did not take over "
                                     f"within {timeout:.0f} s of token 1",
                               fault=FAULT_TRANSFER_TIMEOUT)  # fmt: skip

    async def _fork_target(self, rec: RequestRecord, parent_id: str) -> WorkerRef | None:
        """Where a choice i > 0 of an n > 1 request goes: the serving worker that holds the
        prompt KV of choice 0 (``parent_id``), once it does. Waits until choice 0's KV landed
        there (or it ended). None (route as usual) when choice 0 never decoded (it ended at
        prefill's token, or failed) or that worker is gone. A parent that has finished still
        leaves its prompt blocks in that worker's prefix cache until they are handed out again;
        if they were, the fork's local prefill recomputes what it misses, correct but unshared.
        """
        parent = self.records.get(parent_id)
        if parent is None:
            return None
        rec.trace("fork", f"waits for the prompt KV of {parent_id}")
        await parent.kv_ready.wait()
        target = parent.kv_on
        if target is None or not target.alive:
            return None
        rec.trace("fork", f"shares the prompt blocks of {parent_id} on {target.name}")
        return target

    def _end_attempt(self, attempt: Attempt, finished_by: WorkerRef | None) -> asyncio.Task:
        """End ``attempt`` on its holders (once; later calls join the same task)."""
        if attempt.cleanup is None:
            self.watch.ending(attempt.wire_id)
            attempt.cleanup = asyncio.ensure_future(self._cleanup(attempt, finished_by))
            self._tasks.add(attempt.cleanup)
            attempt.cleanup.add_done_callback(self._tasks.discard)
        return attempt.cleanup

    async def _cleanup(self, attempt: Attempt, finished_by: WorkerRef | None) -> None:
        pending = [call for call in attempt.pending if not call.done()]
        if pending:
            await asyncio.wait(pending, timeout=CALL_TIMEOUT_S)
        for call in attempt.pending:  # retrieve failures so asyncio does not log them as lost
            if call.done() and not call.cancelled():
                call.exception()
        calls = attempt.end_calls(finished_by)
        self.placer.prefill_done(attempt)
        attempt.phase = Phase.DONE
        for worker, method in calls:
            try:
                await self.pool.call(worker, method, [attempt.wire_id])
            except WorkerUnavailable:
                pass  # its blocks went with it
            except Exception as exc:  # the lease audit frees whatever this left behind
                log.warning("%s of %s on %s failed: %r", method, attempt.wire_id, worker.name, exc)
        self.placer.room.set()
        self.watch.kick()

    # ---- workers -------------------------------------------------------------------------
    def _in_use(self, worker: WorkerRef) -> bool:
        return bool(self._held(worker))

    def _held(self, worker: WorkerRef) -> set[str]:
        """Wire ids of the attempts holding state on ``worker`` now."""
        return {rec.attempt.wire_id for rec in self.records.values()
                if rec.attempts and rec.attempt.holds(worker)}  # fmt: skip

    def _on_death(self, worker: WorkerRef) -> None:
        self.index.forget(worker.name)
        for rec in self.records.values():
            attempt = rec.attempts[-1] if rec.attempts else None
            if attempt is not None and attempt.holds(worker):
                self.stream.fail(attempt.wire_id, f"worker {worker.name} failed: {worker.death}",
                                 worker.death or FAULT_WORKER_DIED)  # fmt: skip
        self.placer.room.set()


def _rows(counter: Counter) -> tuple[tuple[str, str, int], ...]:
    return tuple((a, b, n) for (a, b), n in sorted(counter.items()))


def _short(exc: BaseException) -> str:
    """One line for a client: a Ray task error's cause, not its remote traceback."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}".splitlines()[0]
