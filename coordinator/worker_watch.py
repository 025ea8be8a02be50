"""The coordinator's watch over its workers: stats polling with hang and health checks, and the
lease audit.

    every STATS_INTERVAL_S (or sooner, when ``kick``ed): poll every worker's stats; a worker
        silent or busy without progress for ``workers.hang_timeout_s`` is killed as hung, one
        reporting itself unhealthy (steps failing in a row) is killed too; the supervisor
        replaces both, and the requests they held move on (their deaths reach the client)
    every AUDIT_INTERVAL_S: each worker's leases against the attempts that may hold blocks
        there (``held``); any other RESERVED or ACTIVE lease is revoked (aborted). An attempt
        whose end is under way is left alone for 3 audits: an end races the snapshot, and while
        revoking twice is harmless, the count (``leases_revoked``) would lie.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from coordinator.supervisor import Supervisor
from coordinator.worker_pool import WorkerPool, WorkerRef
from core.outputs import FAULT_WORKER_HUNG, FAULT_WORKER_UNHEALTHY

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25
MIN_REFRESH_GAP_S = 0.05  # admissions and ends ask for fresh stats; a burst shares one refresh
AUDIT_INTERVAL_S = 5.0
CALL_TIMEOUT_S = 30.0


class WorkerWatch:
    def __init__(
        self,
        pool: WorkerPool,
        supervisor: Supervisor,
        hang_timeout_s: float,
        held: Callable[[WorkerRef], set[str]],
        on_refresh: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.supervisor = supervisor
        self.hang_timeout_s = hang_timeout_s
        self.held = held  # worker -> wire ids of the attempts that may hold blocks there
        self.on_refresh = on_refresh  # new stats are in (room may have appeared)
        self.leases_revoked = 0  # blocks the audit freed
        self._kicked = asyncio.Event()
        self._ended: dict[str, float] = {}  # wire id -> when its end began
        self._loops: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._refresh_loop(), name="stats"),
                       loop.create_task(self._audit_loop(), name="audit")]  # fmt: skip

    async def aclose(self) -> None:
        for task in self._loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops = []

    def kick(self) -> None:
        """Refresh stats soon (an admission or an end changed some worker's load)."""
        self._kicked.set()

    def ending(self, wire_id: str) -> None:
        """An attempt's end began: its leases are not orphans."""
        self._ended[wire_id] = time.monotonic()

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), STATS_INTERVAL_S)
            self._kicked.clear()
            try:
                await self.pool.refresh(timeout_s=STATS_INTERVAL_S)
                for worker in self.pool.hung(time.monotonic(), self.hang_timeout_s):
                    self.supervisor.kill(worker, FAULT_WORKER_HUNG)
                for worker in self.pool.unhealthy():
                    self.supervisor.kill(worker, FAULT_WORKER_UNHEALTHY)
                self.on_refresh()
            except Exception:  # the loop must outlive any one bad answer
                log.exception("stats refresh failed")
            await asyncio.sleep(MIN_REFRESH_GAP_S)

    async def _audit_loop(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_INTERVAL_S)
            for worker in [w for w in self.pool.workers.values() if w.alive]:
                try:
                    await self._audit(worker)
                except Exception as exc:  # a dead or slow worker is the stats loop's business
                    log.debug("lease audit of %s skipped: %r", worker.name, exc)

    async def _audit(self, worker: WorkerRef) -> None:
        now = time.monotonic()
        for wire_id in [w for w, t in self._ended.items() if now - t > 3 * AUDIT_INTERVAL_S]:
            del self._ended[wire_id]
        leases = await asyncio.wait_for(self.pool.call(worker, "leases"), CALL_TIMEOUT_S)
        held = self.held(worker)
        # SENDING and QUARANTINED leases end on their own (transfer done / deadline)
        orphans = {rid: n for rid, (state, n) in leases.items()
                   if state in ("reserved", "active") and rid not in held
                   and rid not in self._ended}  # fmt: skip
        if orphans:
            log.warning("revoking %d blocks on %s held for ended requests: %s",
                        sum(orphans.values()), worker.name, sorted(orphans))  # fmt: skip
            self.leases_revoked += sum(orphans.values())
            await self.pool.call(worker, "abort", sorted(orphans))
