"""Put one attempt of a request on workers: route, reserve the decode side, hand the prompt over.

    remote (disaggregated): route -> decode.reserve(prompt [+ tokens so far])
                                       (its cached prefix is reused, not sent)
                            -> prefill.prefill(..., num_cached): sends the other blocks
    local:                  colocated.add_request; decode.add_request (the decode worker prefills
                            itself: conditional disaggregation, recompute, no prefill worker,
                            n_fork: choice i > 0 of an n > 1 request, whose prompt blocks
                            choice 0 brought there, so only the tail past them is computed)

Routing sees each worker's cached share of the prompt (coordinator/kv_index.py) and load.
A decode worker prefills locally, with no transfer, when the part of the prompt it lacks is at
most ``local_prefill.max_tokens``, when every prefill worker has ``prefill_queue_tokens`` queued,
or when no prefill worker is alive. Waits while no worker has room (a decode worker refuses
rather than over-commits), and while the serving pool has no live worker but one is being
restarted (up to ``retry.worker_wait_s``). Placements are counted against a worker before its
call returns, so a burst of arrivals between two stats refreshes spreads over the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from coordinator.kv_index import PrefixIndex
from coordinator.request_state import Attempt, Phase, RequestRecord
from coordinator.router import DecodeLoad, PrefillLoad, Route, Weights, blocks_for, route
from coordinator.worker_pool import WorkerPool, WorkerRef, WorkerUnavailable
from core.block_hash import prefix_hashes
from core.config import TandemConfig

ROOM_POLL_S = 0.05  # a queued request re-checks for room at least this often


class NoLiveWorker(Exception):
    """A pool has no live worker and none is coming back in time: not worth a retry."""


class RequestTooLarge(ValueError):
    """The request cannot fit on any worker of the pool, however empty."""


class Placer:
    def __init__(
        self,
        config: TandemConfig,
        pool: WorkerPool,
        recovering: Callable[[str], bool],
        index: PrefixIndex | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.colocated = config.mode == "colocated"
        self.serving_role = "colocated" if self.colocated else "decode"
        self.recovering = recovering  # role -> is a dead worker of it being replaced?
        self.index = index or PrefixIndex()
        coordinator = config.coordinator
        self.weights = Weights(coordinator.kv_routing.overlap_weight,
                               coordinator.kv_routing.load_weight)  # fmt: skip
        self.local = coordinator.local_prefill
        self.room = asyncio.Event()  # set whenever blocks may have been freed or workers joined
        self.locations: Counter[tuple[str, str]] = Counter()  # (where, why) -> attempts
        self.decisions: Counter[tuple[str, str]] = Counter()  # (pool, why) -> choices
        self._turn = 0

    async def place(self, rec: RequestRecord, attempt: Attempt) -> None:
        """Raises WorkerUnavailable (a worker died under the call), NoLiveWorker, or what a
        worker raised (e.g. the request does not fit it)."""
        ids = [*rec.prompt_token_ids, *attempt.resume_token_ids]
        params = rec.params_for(attempt).to_dict()
        resume = list(attempt.resume_token_ids)
        deadline = time.monotonic() + self.config.coordinator.retry.worker_wait_s
        hashes: list[int] | None = None
        while True:
            await self._wait_for_workers(deadline)
            block_size = self.pool.live(self.serving_role)[0].block_size
            if hashes is None:  # the blocks a worker's prefix cache can hold of this prompt
                hashes = prefix_hashes(ids, block_size, limit=(len(ids) - 1) // block_size)
            if attempt.local_on is not None and attempt.local_on.alive:
                chosen, why = Route(None, attempt.local_on.name), attempt.local_why
            else:
                chosen = self._route(ids, hashes)
                if chosen is None:
                    await self._wait_for_room()
                    continue
                why = self._local_reason(len(ids), self.pool[chosen.decode_worker_id], hashes)
                if why is not None:
                    chosen = Route(None, chosen.decode_worker_id)
            server = self.pool[chosen.decode_worker_id]
            # counted before the call: concurrent placements must see each other
            server.num_reserved_since_stats += blocks_for(len(ids), block_size)
            server.num_placed_since_stats += 1
            attempt.decode = server  # before the call: an abort must reach it
            rec.trace("route", f"{chosen.prefill_worker_id or 'local'} -> {server.name}")
            if chosen.prefill_worker_id is None:
                attempt.phase, attempt.local_why = Phase.PREFILLING, why or "local"
                if not self.colocated:
                    self.locations["local", why or "local"] += 1
                await self._call(attempt, server, "add_request", attempt.wire_id,
                                 list(rec.prompt_token_ids), params, resume)  # fmt: skip
                break
            reserved = await self._call(
                attempt, server, "reserve", attempt.wire_id, list(rec.prompt_token_ids), params,
                resume,
            )  # fmt: skip
            if reserved is None:  # its snapshot was stale: full until the next stats say not
                attempt.decode = None
                server.num_reserved_since_stats = server.num_blocks
                server.num_placed_since_stats -= 1
                continue
            blocks, num_cached = reserved["block_ids"], reserved["num_cached"]
            attempt.num_blocks, attempt.num_cached_blocks = len(blocks), num_cached
            rec.trace("reserved", f"{len(blocks)} blocks on {server.name}, {num_cached} cached")
            prefill = self.pool[chosen.prefill_worker_id]
            attempt.prefill, attempt.phase, attempt.prefill_asked = prefill, Phase.PREFILLING, True
            attempt.overlapped = self.config.kv_transfer.layer_groups > 1
            prefill.num_queued_tokens += len(ids)
            attempt.num_queued_tokens = len(ids)
            self.locations["remote", "default"] += 1
            await self._call(
                attempt, prefill, "prefill", attempt.wire_id, list(rec.prompt_token_ids), params,
                server.name, blocks, resume, num_cached,
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
        """Until the serving pool has a live worker (a dead prefill pool is not waited for:
        decode workers then prefill themselves)."""
        while not self.pool.routable(self.serving_role):
            remaining = deadline - time.monotonic()
            if not self.recovering(self.serving_role) or remaining <= 0:
                raise NoLiveWorker(f"no live {self.serving_role} worker")
            self.pool.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pool.changed.wait(), min(remaining, 1.0))

    def _cached(self, worker: WorkerRef, hashes: list[int]) -> int:
        return self.index.cached_blocks(worker.name, worker.incarnation, hashes)

    def _route(self, ids: list[int], hashes: list[int]) -> Route | None:
        servers = self.pool.routable(self.serving_role)
        block_size = servers[0].block_size
        num_blocks = blocks_for(len(ids), block_size)
        if num_blocks > max(w.num_blocks for w in servers):
            raise RequestTooLarge(
                f"the request needs {num_blocks} KV blocks; the largest "
                f"{self.serving_role} worker has {max(w.num_blocks for w in servers)}"
            )
        decode_loads = [
            DecodeLoad(w.name, w.num_free_blocks, w.num_running, w.num_blocks - w.num_free_blocks,
                       self._cached(w, hashes))  # fmt: skip
            for w in servers
        ]
        prefills = [] if self.colocated else self.pool.routable("prefill")
        prefill_loads = [
            PrefillLoad(w.name, w.num_queued_tokens, w.stats.get("running", 0),
                        self._cached(w, hashes) * block_size)  # fmt: skip
            for w in prefills
        ]
        policy = self.config.coordinator.routing
        # no live prefill worker: choose the decode worker alone (it will prefill itself)
        chosen = route(policy, decode_loads, prefill_loads or None, len(ids), block_size,
                       self._turn, self.weights)  # fmt: skip
        if chosen is None and self.colocated:
            # A colocated worker queues (and preempts) in its own scheduler: never hold back.
            best = max(servers, key=lambda w: (w.num_free_blocks, w.name))
            chosen = Route(None, best.name)
        if chosen is not None:
            decoded = {w.worker_id: w.num_cached_blocks for w in decode_loads}
            self._count(policy, self.serving_role, decoded[chosen.decode_worker_id])
            if chosen.prefill_worker_id is not None:
                prefilled = {w.worker_id: w.num_cached_prefix_tokens for w in prefill_loads}
                self._count(policy, "prefill", prefilled[chosen.prefill_worker_id])
        return chosen

    def _count(self, policy: str, pool: str, num_cached: int) -> None:
        """A routing decision, by why: the chosen worker holds part of the prompt, or not."""
        why = "round_robin" if policy == "round_robin" else "prefix" if num_cached else "load"
        self.decisions[pool, why] += 1

    def _local_reason(self, num_tokens: int, decode: WorkerRef, hashes: list[int]) -> str | None:
        """Why ``decode`` should prefill this itself (None: hand it to the prefill pool)."""
        if self.colocated:
            return "colocated"
        prefills = self.pool.routable("prefill")
        if not prefills:
            return "no_prefill_worker"
        uncached = num_tokens - self._cached(decode, hashes) * decode.block_size
        if self.local.max_tokens and uncached <= self.local.max_tokens:
            return "short"
        busy = self.local.prefill_queue_tokens
        if busy and min(w.num_queued_tokens for w in prefills) >= busy:
            return "prefill_busy"
        return None

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
