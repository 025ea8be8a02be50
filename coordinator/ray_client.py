"""``EngineClient`` over Ray worker actors (docs/serving.md): the disaggregated request flow.

    generate(request):
        open a token queue                                  (before any worker sees the request)
        route over recent stats -> decode.reserve(prompt)   (None: no room; retry/queue here)
        prefill.prefill(prompt, decode, dst blocks)         (colocated: worker.add_request)
        tokens <- queue: reorder, detokenize, stop strings  (OutputAssembler)
        finally: abort every holder that did not finish it  (RequestRecord.workers_to_abort)

Stats of every worker are refreshed every ``STATS_INTERVAL_S`` and soon after each admission;
between refreshes the blocks this coordinator reserved are counted against the worker, so a
burst of arrivals does not pile onto one snapshot. A worker whose actor died is marked dead at
its next call (stats included): its in-flight requests end with an error, and /health reports
its pool down when no live worker remains in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from coordinator.engine_client import EngineStats
from coordinator.output_assembler import OutputAssembler
from coordinator.request_state import Phase, RequestRecord
from coordinator.router import DecodeLoad, PrefillLoad, Route, blocks_for, route
from coordinator.token_stream import TokenStream
from coordinator.worker_pool import WorkerPool, WorkerRef, WorkerUnavailable
from core.config import TandemConfig
from core.outputs import FINISH_LENGTH, FINISH_REJECTED, FINISH_STOP, OutputDelta
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25
MIN_REFRESH_GAP_S = 0.05  # admissions and ends ask for fresh stats; a burst shares one refresh
ROOM_POLL_S = 0.05  # a queued request re-checks for room at least this often
CALL_TIMEOUT_S = 30.0  # waiting for an in-flight call before aborting what it started


class RayEngineClient:
    def __init__(
        self,
        config: TandemConfig,
        workers: list[WorkerRef],
        stream: TokenStream,
        tokenizer: Tokenizer,
    ) -> None:
        self.config = config
        self.colocated = config.mode == "colocated"
        self.serving_role = "colocated" if self.colocated else "decode"
        self.pool = WorkerPool(workers, on_death=self._fail_requests_of)
        self.stream = stream
        self.tokenizer = tokenizer
        self.records: dict[str, RequestRecord] = {}
        self._turn = 0
        self._room = asyncio.Event()  # set whenever blocks may have been freed
        self._kick = asyncio.Event()  # asks the stats loop for a refresh now
        self._refresher: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.stream.start()
        await self.pool.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for rid in list(self.records):
            self.stream.fail(rid, "the server is shutting down")

    # ---- EngineClient --------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[OutputDelta]:
        rec = RequestRecord(request_id, len(prompt_token_ids))
        self.records[request_id] = rec
        queue = self.stream.open(request_id)
        assembler = OutputAssembler(self.tokenizer, prompt_token_ids, params)
        finished_by: str | None = None
        try:
            try:
                await self._place(rec, list(prompt_token_ids), params)
            except WorkerUnavailable as exc:
                self.stream.fail(request_id, str(exc))
            except Exception as exc:  # a worker refused the request (RayTaskError and kin)
                log.warning("placing %s failed: %r", request_id, exc)
                self.stream.fail(request_id, _short(exc))
            while not assembler.finished:
                for out in assembler.push(await queue.get()):
                    if out.token_ids and rec.phase == Phase.PREFILLING:
                        self._first_token(rec)
                    # rejected: a worker refused the grammar before any KV moved
                    natural = out.finish_reason in (FINISH_STOP, FINISH_LENGTH, FINISH_REJECTED)
                    if natural and not assembler.stopped_here:
                        finished_by = self._finisher(rec, out)
                    yield out
        finally:
            self.stream.close(request_id)
            await asyncio.shield(self._release(rec, finished_by))

    async def abort(self, request_id: str) -> None:
        rec = self.records.get(request_id)
        if rec is not None:
            await asyncio.shield(self._release(rec, None))

    async def health(self) -> dict[str, bool]:
        return {role: bool(self.pool.live(role)) for role in self.config.pool_names}

    async def stats(self) -> EngineStats:
        records = self.records.values()
        return EngineStats(
            pools=tuple(self.pool.pool_stats(role) for role in self.config.pool_names),
            transfers=self.pool.transfer_totals(),
            num_running=sum(r.phase == Phase.DECODING for r in records),
            num_waiting=sum(r.phase in (Phase.QUEUED, Phase.PREFILLING) for r in records),
            spec=self.pool.spec_totals(),
        )

    # ---- placement -----------------------------------------------------------------------
    def _route(self, num_tokens: int) -> Route | None:
        servers = self.pool.live(self.serving_role)
        decode_loads = [
            DecodeLoad(w.name, w.num_free_blocks, w.stats.get("running", 0)) for w in servers
        ]
        prefill_loads = None
        if not self.colocated:
            prefill_loads = [
                PrefillLoad(w.name, w.num_queued_tokens, w.stats.get("running", 0))
                for w in self.pool.live("prefill")
            ]
        block_size = servers[0].block_size
        chosen = route(
            self.config.coordinator.routing,
            decode_loads,
            prefill_loads,
            num_tokens,
            block_size,
            self._turn,
        )
        if chosen is None and self.colocated:
            # A colocated worker queues (and preempts) in its own scheduler: never hold back.
            best = max(servers, key=lambda w: (w.num_free_blocks, w.name))
            chosen = Route(None, best.name)
        return chosen

    async def _place(self, rec: RequestRecord, ids: list[int], params: SamplingParams) -> None:
        wire_params = params.to_dict()
        while True:
            servers = self.pool.live(self.serving_role)
            if not servers:
                raise WorkerUnavailable(f"no live {self.serving_role} worker")
            if not self.colocated and not self.pool.live("prefill"):
                raise WorkerUnavailable("no live prefill worker")
            num_blocks = blocks_for(len(ids), servers[0].block_size)
            if num_blocks > max(w.num_blocks for w in servers):
                raise WorkerUnavailable(
                    f"the prompt needs {num_blocks} KV blocks; the largest worker has "
                    f"{max(w.num_blocks for w in servers)}"
                )
            chosen = self._route(len(ids))
            if chosen is None:
                await self._wait_for_room()
                continue
            server = self.pool[chosen.decode_worker_id]
            rec.decode_worker = server.name  # before the call: an abort must reach it
            if self.colocated:
                rec.phase = Phase.PREFILLING
                server.num_reserved_since_stats += num_blocks
                await self._tracked(rec, server, "add_request", rec.request_id, ids, wire_params)
                break
            blocks = await self._tracked(
                rec, server, "reserve", rec.request_id, ids, wire_params
            )
            if blocks is None:  # its snapshot was stale: full until the next stats say not
                rec.decode_worker = None
                server.num_reserved_since_stats = server.num_blocks
                continue
            server.num_reserved_since_stats += len(blocks)
            rec.dst_block_ids = tuple(blocks)
            prefill = self.pool[chosen.prefill_worker_id]
            rec.prefill_worker, rec.phase = prefill.name, Phase.PREFILLING
            prefill.num_queued_tokens += len(ids)
            await self._tracked(
                rec, prefill, "prefill", rec.request_id, ids, wire_params, server.name, blocks
            )
            break
        self._turn += 1
        self._kick.set()

    async def _wait_for_room(self) -> None:
        self._room.clear()
        self._kick.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), ROOM_POLL_S)

    def _first_token(self, rec: RequestRecord) -> None:
        rec.phase = Phase.DECODING
        if rec.prefill_worker is not None:
            prefill = self.pool[rec.prefill_worker]
            prefill.num_queued_tokens = max(0, prefill.num_queued_tokens - rec.num_prompt_tokens)

    def _finisher(self, rec: RequestRecord, out: OutputDelta) -> str | None:
        """The worker that sent a normal finish: token 1 comes from prefill, the rest decode."""
        if rec.prefill_worker is not None and out.num_output_tokens <= 1:
            return rec.prefill_worker
        return rec.decode_worker

    # ---- actor calls ---------------------------------------------------------------------
    async def _tracked(self, rec: RequestRecord, worker: WorkerRef, method: str, *args: Any):
        """A call whose effect must be undone if the request ends: recorded as pending, and
        shielded so that a cancelled request still learns when (and whether) it took effect."""
        call = asyncio.ensure_future(self.pool.call(worker, method, *args))
        rec.pending.append(call)
        return await asyncio.shield(call)

    def _fail_requests_of(self, worker: WorkerRef) -> None:
        for rec in self.records.values():
            if rec.uses(worker.name):
                self.stream.fail(rec.request_id, f"worker {worker.name} died")
        self._room.set()

    async def _release(self, rec: RequestRecord, finished_by: str | None) -> None:
        if rec.release is None:
            rec.release = asyncio.ensure_future(self._do_release(rec, finished_by))
        await asyncio.shield(rec.release)

    async def _do_release(self, rec: RequestRecord, finished_by: str | None) -> None:
        pending = [call for call in rec.pending if not call.done()]
        if pending:
            await asyncio.wait(pending, timeout=CALL_TIMEOUT_S)
        for call in rec.pending:  # retrieve failures so asyncio does not log them as lost
            if call.done() and not call.cancelled():
                call.exception()
        if rec.phase == Phase.PREFILLING:
            self._first_token(rec)  # releases its share of the prefill queue estimate
        targets = rec.workers_to_abort(finished_by)
        rec.phase = Phase.DONE
        for name in targets:
            worker = self.pool[name]
            if worker.alive:
                try:
                    await self.pool.call(worker, self._end_method(rec, worker, finished_by),
                                         [rec.request_id])  # fmt: skip
                except WorkerUnavailable:
                    pass  # its blocks went with it
        self.records.pop(rec.request_id, None)
        self._room.set()
        self._kick.set()

    @staticmethod
    def _end_method(rec: RequestRecord, worker, finished_by: str | None) -> str:
        """``release`` a decode reservation that no KV was or will be written into (prefill was
        never asked, or token 1 ended the request on prefill): freed at once. Otherwise
        ``abort``, which quarantines a reservation whose KV may still be in flight."""
        if worker.role == "decode" and (
            rec.prefill_worker is None or finished_by == rec.prefill_worker
        ):
            return "release"
        return "abort"

    # ---- stats ---------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), STATS_INTERVAL_S)
            self._kick.clear()
            try:
                await self.pool.refresh()
                self._room.set()
            except Exception:  # the loop must outlive any one bad answer
                log.exception("stats refresh failed")
            await asyncio.sleep(MIN_REFRESH_GAP_S)


def _short(exc: BaseException) -> str:
    """One line for a client: a Ray task error's cause, not its remote traceback."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}".splitlines()[0]
