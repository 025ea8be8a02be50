"""Put one attempt of a request on workers: route, reserve the decode side, hand the prompt over.

    remote (disaggregated):  route -> decode.reserve(prompt [+ tokens so far]) -> prefill.prefill
    local:                   colocated.add_request, or decode.add_request (recompute on decode)

Waits while no worker has room (a decode worker refuses rather than over-commits), and while a
pool has no live worker but one is being restarted (up to ``retry.worker_wait_s``). Placements
are counted against a worker before its call returns, so a burst of arrivals between two stats
refreshes spreads over the pool instead of piling onto one snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from coordinator.request_state import Attempt, Phase, RequestRecord
from coordinator.router import DecodeLoad, PrefillLoad, Route, blocks_for, route
from coordinator.worker_pool import WorkerPool, WorkerRef, WorkerUnavailable
from core.config import TandemConfig

ROOM_POLL_S = 0.05  # a queued request re-checks for room at least this often


class NoLiveWorker(Exception):
    """A pool has no live worker and none is coming back in time: not worth a retry."""


class RequestTooLarge(ValueError):
    """The request cannot fit on any worker of the pool, however empty."""


class Placer:
    def __init__(
        self, config: TandemConfig, pool: WorkerPool, recovering: Callable[[str], bool]
    ) -> None:
        self.config = config
        self.pool = pool
        self.colocated = config.mode == "colocated"
        self.serving_role = "colocated" if self.colocated else "decode"
        self.recovering = recovering  # role -> is a dead worker of it being replaced?
        self.room = asyncio.Event()  # set whenever blocks may have been freed or workers joined
        self._turn = 0

    async def place(self, rec: RequestRecord, attempt: Attempt) -> None:
        """Raises WorkerUnavailable (a worker died under the call), NoLiveWorker, or what a
        worker raised (e.g. the request does not fit it)."""
        ids = [*rec.prompt_token_ids, *attempt.resume_token_ids]
        params = rec.params_for(attempt).to_dict()
        resume = list(attempt.resume_token_ids)
        deadline = time.monotonic() + self.config.coordinator.retry.worker_wait_s
        while True:
            await self._wait_for_workers(deadline)
            if attempt.local_on is not None and attempt.local_on.alive:
                server: WorkerRef = attempt.local_on
                chosen = Route(None, server.name)
            else:
                chosen = self._route(len(ids))
                if chosen is None:
                    await self._wait_for_room()
                    continue
                server = self.pool[chosen.decode_worker_id]
            num_blocks = blocks_for(len(ids), server.block_size)
            # counted before the call: concurrent placements must see each other
            server.num_reserved_since_stats += num_blocks
            server.num_placed_since_stats += 1
            attempt.decode = server  # before the call: an abort must reach it
            rec.trace("route", f"{chosen.prefill_worker_id or 'local'} -> {server.name}")
            if chosen.prefill_worker_id is None:
                attempt.phase = Phase.PREFILLING
                await self._call(attempt, server, "add_request", attempt.wire_id,
                                 list(rec.prompt_token_ids), params, resume)  # fmt: skip
                break
            blocks = await self._call(
                attempt, server, "reserve", attempt.wire_id, list(rec.prompt_token_ids), params,
                resume,
            )  # fmt: skip
            if blocks is None:  # its snapshot was stale: full until the next stats say not
                attempt.decode = None
                server.num_reserved_since_stats = server.num_blocks
                server.num_placed_since_stats -= 1
                continue
            attempt.num_blocks = len(blocks)
            rec.trace("reserved", f"{len(blocks)} blocks on {server.name}")
            prefill = self.pool[chosen.prefill_worker_id]
            attempt.prefill, attempt.phase, attempt.prefill_asked = prefill, Phase.PREFILLING, True
            prefill.num_queued_tokens += len(ids)
            attempt.num_queued_tokens = len(ids)
            await self._call(
                attempt, prefill, "prefill", attempt.wire_id, list(rec.prompt_token_ids), params,
                server.name, blocks, resume,
            )  # fmt: skip
            break
        self._turn += 1

    def prefill_done(self, attempt: Attempt) -> None:
        """The attempt's prefill is over (or abandoned): its tokens leave the queue estimate."""
        if attempt.prefill is not None and attempt.num_queued_tokens:
            # the estimate is per incarnation: a replaced worker starts from zero
            left = attempt.prefill.num_queued_tokens - attempt.num_queued_tokens
            attempt.prefill.num_queued_tokens = max(0, left)
            attempt.num_queued_tokens = 0

    # ---- internals -----------------------------------------------------------------------
    async def _wait_for_workers(self, deadline: float) -> None:
        roles = [self.serving_role] if self.colocated else ["decode", "prefill"]
        while True:
            missing = [r for r in roles if not self.pool.live(r)]
            if not missing:
                return
            role = missing[0]
            remaining = deadline - time.monotonic()
            if not self.recovering(role) or remaining <= 0:
                raise NoLiveWorker(f"no live {role} worker")
            self.pool.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pool.changed.wait(), min(remaining, 1.0))

    def _route(self, num_tokens: int) -> Route | None:
        servers = self.pool.live(self.serving_role)
        num_blocks = blocks_for(num_tokens, servers[0].block_size)
        if num_blocks > max(w.num_blocks for w in servers):
            raise RequestTooLarge(
                f"the request needs {num_blocks} KV blocks; the largest "
                f"{self.serving_role} worker has {max(w.num_blocks for w in servers)}"
            )
        decode_loads = [DecodeLoad(w.name, w.num_free_blocks, w.num_running) for w in servers]
        prefill_loads = None
        if not self.colocated:
            prefill_loads = [
                PrefillLoad(w.name, w.num_queued_tokens, w.stats.get("running", 0))
                for w in self.pool.live("prefill")
            ]
        chosen = route(self.config.coordinator.routing, decode_loads, prefill_loads, num_tokens,
                       servers[0].block_size, self._turn)  # fmt: skip
        if chosen is None and self.colocated:
            # A colocated worker queues (and preempts) in its own scheduler: never hold back.
            best = max(servers, key=lambda w: (w.num_free_blocks, w.name))
            chosen = Route(None, best.name)
        return chosen

    async def _wait_for_room(self) -> None:
        self.room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.room.wait(), ROOM_POLL_S)

    async def _call(self, attempt: Attempt, worker: WorkerRef, method: str, *args: Any) -> Any:
        """A call whose effect must be undone if the attempt ends: recorded as pending, and
        shielded so that a cancelled request still learns when (and whether) it took effect."""
        call = asyncio.ensure_future(self.pool.call(worker, method, *args))
        attempt.pending.append(call)
        return await asyncio.shield(call)


__all__ = ["NoLiveWorker", "Placer", "RequestTooLarge", "WorkerUnavailable"]
