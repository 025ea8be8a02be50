"""The coordinator's view of its worker actors: handles, liveness, progress and the latest stats.

A ``WorkerRef`` is one *incarnation* of a worker: when ``decode-0`` is replaced, the new actor is a
new ``WorkerRef`` under the same name, and the old one stays dead. Every actor call goes through
``WorkerPool.call``, so a dead actor is noticed by whichever call hits it first (the periodic
stats poll included): it is marked dead once and every ``on_death`` callback runs (the client
moves its requests, the supervisor replaces it). Dead incarnations keep their last stats so that
cumulative transfer counters never go down.

Stats are polled without ever waiting for a slow worker: each worker has at most one stats call
in flight, and a worker that answers nothing, or answers but makes no progress while it has work,
for ``hang_timeout_s`` is reported by ``hung()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from coordinator.engine_client import PoolStats, SpecStats, TransferStats, WorkerStatus

log = logging.getLogger(__name__)


class WorkerUnavailable(Exception):
    pass


@dataclass(eq=False)
class WorkerRef:
    name: str
    role: str  # "prefill" | "decode" | "colocated"
    actor: Any  # a Ray ActorHandle of coordinator.worker_host.WorkerHost
    num_blocks: int
    block_size: int
    kv_address: str | None = None
    bytes_per_block: int = 0  # of its KV cache (what a transfer into it lands per block)
    incarnation: int = 0
    pid: int | None = None
    alive: bool = True
    death: str | None = None  # why it is dead: a core.outputs FAULT_* reason
    draining: bool = False  # being scaled away: no new requests, running ones finish
    stats: dict = field(default_factory=dict)
    num_reserved_since_stats: int = 0  # blocks this coordinator took since ``stats`` was read
    num_placed_since_stats: int = 0  # requests placed here since ``stats`` was read
    num_queued_tokens: int = 0  # prefill: prompt tokens handed over whose token 1 is not back
    last_answer: float = field(default_factory=time.monotonic)  # last stats answer
    last_progress: float = field(default_factory=time.monotonic)  # last sign of progress
    stats_call: asyncio.Future | None = None

    @property
    def num_free_blocks(self) -> int:
        used = self.stats.get("kv_blocks_used", 0) + self.num_reserved_since_stats
        return max(0, self.num_blocks - used)

    @property
    def num_running(self) -> int:
        return self.stats.get("running", 0) + self.num_placed_since_stats

    def observe(self, stats: dict, now: float) -> None:
        """A stats answer: progress is new iterations, or having nothing to do."""
        if not stats.get("busy") or stats.get("iterations") != self.stats.get("iterations"):
            self.last_progress = now
        self.last_answer = now
        self.stats = stats
        self.num_reserved_since_stats = 0
        self.num_placed_since_stats = 0


class WorkerPool:
    def __init__(self, workers: list[WorkerRef] = ()) -> None:
        self.workers: dict[str, WorkerRef] = {}  # name -> current incarnation
        self.retired: list[WorkerRef] = []  # replaced incarnations (their counters still count)
        self.on_death: list[Callable[[WorkerRef], None]] = []
        self.changed = asyncio.Event()  # set whenever a worker joins or dies
        for w in workers:
            self.add(w)

    def __getitem__(self, name: str) -> WorkerRef:
        return self.workers[name]

    def add(self, worker: WorkerRef) -> None:
        """A new worker, or a new incarnation replacing a dead one of the same name."""
        old = self.workers.get(worker.name)
        if old is not None:
            if old.alive:
                raise ValueError(f"worker {worker.name} is alive; it cannot be replaced")
            self.retired.append(old)
        self.workers[worker.name] = worker
        self.changed.set()

    def remove(self, name: str) -> None:
        """A dead worker that will not come back (scaled away): only its counters remain."""
        worker = self.workers.pop(name)
        assert not worker.alive, f"{name} is alive"
        self.retired.append(worker)
        self.changed.set()

    def live(self, role: str) -> list[WorkerRef]:
        return [w for w in self.workers.values() if w.role == role and w.alive]

    def routable(self, role: str) -> list[WorkerRef]:
        """Live workers that take new requests (a draining one does not)."""
        return [w for w in self.live(role) if not w.draining]

    async def call(self, worker: WorkerRef, method: str, *args: Any) -> Any:
        if not worker.alive:
            raise WorkerUnavailable(f"worker {worker.name} is gone ({worker.death})")
        try:
            return await worker.actor.call.remote(method, *args)
        except RayActorError as exc:
            self.mark_dead(worker, "worker_died", exc)
            raise WorkerUnavailable(f"worker {worker.name} is gone: {type(exc).__name__}") from None

    def mark_dead(self, worker: WorkerRef, reason: str, cause: object = None) -> None:
        if not worker.alive:
            return
        worker.alive, worker.death = False, reason
        log.error("worker %s (incarnation %d) is dead: %s (%s)", worker.name,
                  worker.incarnation, reason, cause)  # fmt: skip
        self.changed.set()
        for callback in self.on_death:
            callback(worker)

    # ------------------------------------------------------------------ stats
    def poll_stats(self) -> None:
        """Ask every live worker for stats, unless its previous answer is still outstanding;
        answers land in ``WorkerRef.stats`` whenever they come."""
        for w in self.workers.values():
            if w.alive and (w.stats_call is None or w.stats_call.done()):
                w.stats_call = asyncio.ensure_future(self._stats_of(w))

    async def refresh(self, timeout_s: float = 5.0) -> None:
        """Poll, then wait (up to ``timeout_s``) for the answers of this round."""
        self.poll_stats()
        calls = [w.stats_call for w in self.workers.values() if w.alive and w.stats_call]
        if calls:
            await asyncio.wait(calls, timeout=timeout_s)

    async def _stats_of(self, worker: WorkerRef) -> None:
        try:
            stats = await self.call(worker, "stats")
        except WorkerUnavailable:
            return
        except Exception as exc:  # a bug in stats(): the worker still counts as answering
            log.warning("stats of %s failed: %r", worker.name, exc)
            return
        if stats.get("loop_error") and not worker.stats.get("loop_error"):
            log.error("worker %s engine loop failed:\n%s", worker.name, stats["loop_error"])
        worker.observe(stats, time.monotonic())

    def hung(self, now: float, hang_timeout_s: float) -> list[WorkerRef]:
        """Live workers silent, or busy without progress, for longer than ``hang_timeout_s``."""
        return [
            w for w in self.workers.values()
            if w.alive and now - min(w.last_answer, w.last_progress) > hang_timeout_s
        ]  # fmt: skip

    def unhealthy(self) -> list[WorkerRef]:
        """Live workers that report failing step after step."""
        return [w for w in self.workers.values() if w.alive and w.stats.get("unhealthy")]

    # ------------------------------------------------------------------ reports
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
        """Every worker's current incarnation, by name (for /v1/status)."""
        return tuple(
            WorkerStatus(w.name, w.role, w.alive, w.incarnation, w.stats.get("running", 0),
                         w.stats.get("waiting", 0),
                         min(w.stats.get("kv_blocks_used", 0), w.num_blocks),
                         w.num_blocks)  # fmt: skip
            for w in sorted(self.workers.values(), key=lambda w: w.name)
        )

    def _every_incarnation(self) -> list[WorkerRef]:
        return [*self.retired, *self.workers.values()]

    def spec_totals(self) -> SpecStats | None:
        """Speculative-decoding counters summed over every incarnation that reports them."""
        reports = [w.stats["spec"] for w in self._every_incarnation() if w.stats.get("spec")]
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

    def prefix_hit_tokens(self) -> dict[str, int]:
        """Prompt tokens found in a prefix cache, per pool, every incarnation included."""
        totals: dict[str, int] = {}
        for w in self._every_incarnation():
            totals[w.role] = totals.get(w.role, 0) + int(w.stats.get("prefix_hit_tokens", 0))
        return totals

    def transfer_totals(self) -> tuple[TransferStats, ...]:
        """Per backend, summed over the sending side (prefill), which counts each transfer
        once; dead incarnations included."""
        totals: dict[str, list] = {}
        for w in self._every_incarnation():
            backend = w.stats.get("transfer_backend")
            if w.role != "prefill" or not backend:
                continue
            entry = totals.setdefault(backend, [0, 0.0])
            entry[0] += int(w.stats.get("transfer_bytes", 0))
            entry[1] += float(w.stats.get("transfer_seconds", 0.0))
        return tuple(TransferStats(b, n, s) for b, (n, s) in sorted(totals.items()))
