"""The coordinator's view of its worker actors: handles, liveness and the latest stats.

Every actor call goes through ``WorkerPool.call``, so a dead actor is noticed by whichever call
hits it first (the periodic stats refresh included): the worker is marked dead once and
``on_death`` runs (the client fails the requests it held). Dead workers keep their last stats
so that cumulative transfer counters never go down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from coordinator.engine_client import PoolStats, SpecStats, TransferStats, WorkerStatus

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0  # a worker that cannot answer stats in time keeps its old snapshot


class WorkerUnavailable(Exception):
    pass


@dataclass
class WorkerRef:
    name: str
    role: str  # "prefill" | "decode" | "colocated"
    actor: Any  # a Ray ActorHandle of coordinator.worker_host.WorkerHost
    num_blocks: int
    block_size: int
    kv_address: str | None = None
    alive: bool = True
    stats: dict = field(default_factory=dict)
    num_reserved_since_stats: int = 0  # blocks this coordinator took since ``stats`` was read
    num_queued_tokens: int = 0  # prefill: prompt tokens handed over whose token 1 is not back

    @property
    def num_free_blocks(self) -> int:
        used = self.stats.get("kv_blocks_used", 0) + self.num_reserved_since_stats
        return max(0, self.num_blocks - used)


class WorkerPool:
    def __init__(
        self, workers: list[WorkerRef], on_death: Callable[[WorkerRef], None] | None = None
    ) -> None:
        self.workers = {w.name: w for w in workers}
        self.on_death = on_death

    def __getitem__(self, name: str) -> WorkerRef:
        return self.workers[name]

    def live(self, role: str) -> list[WorkerRef]:
        return [w for w in self.workers.values() if w.role == role and w.alive]

    async def call(self, worker: WorkerRef, method: str, *args: Any) -> Any:
        try:
            return await worker.actor.call.remote(method, *args)
        except RayActorError as exc:
            self.mark_dead(worker, exc)
            raise WorkerUnavailable(f"worker {worker.name} is gone: {type(exc).__name__}") from None

    def mark_dead(self, worker: WorkerRef, exc: BaseException) -> None:
        if not worker.alive:
            return
        worker.alive = False
        log.error("worker %s died (%s)", worker.name, exc)
        if self.on_death is not None:
            self.on_death(worker)

    async def refresh(self) -> None:
        """New stats from every live worker (concurrently); a reservation count starts over
        with each answer, which already includes the blocks reserved before it."""

        async def one(worker: WorkerRef) -> None:
            try:
                stats = await asyncio.wait_for(self.call(worker, "stats"), STATS_TIMEOUT_S)
            except (WorkerUnavailable, TimeoutError):
                return
            if stats.get("loop_error") and not worker.stats.get("loop_error"):
                log.error("worker %s engine loop failed:\n%s", worker.name, stats["loop_error"])
            worker.stats = stats
            worker.num_reserved_since_stats = 0

        await asyncio.gather(*(one(w) for w in self.workers.values() if w.alive))

    def pool_stats(self, role: str) -> PoolStats:
        live = self.live(role)
        return PoolStats(
            role,
            sum(min(w.stats.get("kv_blocks_used", 0), w.num_blocks) for w in live),
            sum(w.num_blocks for w in live),
            sum(w.stats.get("running", 0) for w in live),
            sum(w.stats.get("waiting", 0) for w in live),
        )

    def worker_status(self) -> tuple[WorkerStatus, ...]:
        """Every worker, for the status page; incarnation stays 0 until restarts exist."""
        return tuple(
            WorkerStatus(
                w.name, w.role, w.alive, 0, w.stats.get("running", 0), w.stats.get("waiting", 0),
                min(w.stats.get("kv_blocks_used", 0), w.num_blocks), w.num_blocks,
            )
            for w in self.workers.values()
        )

    def spec_totals(self) -> SpecStats | None:
        """Speculative-decoding counters summed over every worker that reports them."""
        reports = [w.stats["spec"] for w in self.workers.values() if w.stats.get("spec")]
        if not reports:
            return None
        width = max(len(r["accepted_per_position"]) for r in reports)

        def per_position(key: str) -> tuple[int, ...]:
            sums = [0] * width
            for r in reports:
                for j, v in enumerate(r[key]):
                    sums[j] += v
            return tuple(sums)

        return SpecStats(
            draft_tokens=sum(r["draft_tokens"] for r in reports),
            accepted_tokens=sum(r["accepted_tokens"] for r in reports),
            verified=sum(r["verified"] for r in reports),
            accepted_per_position=per_position("accepted_per_position"),
            proposed_per_position=per_position("proposed_per_position"),
        )

    def transfer_totals(self) -> tuple[TransferStats, ...]:
        """Per backend, summed over the sending side (prefill), which counts each transfer
        once; dead workers included."""
        totals: dict[str, list] = {}
        for w in self.workers.values():
            backend = w.stats.get("transfer_backend")
            if w.role != "prefill" or not backend:
                continue
            entry = totals.setdefault(backend, [0, 0.0])
            entry[0] += int(w.stats.get("transfer_bytes", 0))
            entry[1] += float(w.stats.get("transfer_seconds", 0.0))
        return tuple(TransferStats(b, n, s) for b, (n, s) in sorted(totals.items()))
