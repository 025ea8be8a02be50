"""Keeps every pool at its target size: starts the worker actors, joins each new one to its peers,
and replaces the ones that die, hang or keep failing (``coordinator.workers``).

    start()             every worker of the topology (incarnation 0) ready, joined, in the pool
    a worker dies       (WorkerPool.mark_dead: a call found its actor gone, or kill() below)
                        -> its actor is killed for good; a dead decode worker is forgotten by
                           every live prefill worker (its NIXL agent and metadata dropped)
                        -> replaced: a new actor (incarnation + 1), retried with backoff
    kill(worker, why)   hung or unhealthy: marked dead first (its requests move), then killed

Joining: every live prefill worker handshakes a new decode worker, a new prefill worker
handshakes every live decode worker, and only then does the newcomer enter the pool (routable).
Joins are serialised, so two workers replaced at once still find each other.

Scaling (``scale(role, replicas)``, while serving): new workers start and join as above; extra
ones (the highest-numbered first) are drained: no new requests, the running ones finish (or, past
``workers.drain_timeout_s``, move elsewhere), then the worker is shut down and forgotten by its
peers, its plan dropped so that nothing replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from coordinator.engine_client import PoolHealth
from coordinator.worker_pool import WorkerPool, WorkerRef, WorkerUnavailable
from coordinator.worker_specs import WorkerPlan

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.5  # a replacement that failed to start is tried again after this, doubling
MAX_RETRY_S = 30.0

Spawn = Callable[[WorkerPlan, int], Any]  # (plan, incarnation) -> an actor handle
Kill = Callable[[Any], None]
MakePlan = Callable[[str, int], WorkerPlan]  # (role, index) -> the plan of "<role>-<index>"
DRAIN_POLL_S = 0.1
SHUTDOWN_TIMEOUT_S = 15.0
RETIRED = "worker_retired"  # the death of a worker scaled away


class Supervisor:
    def __init__(
        self,
        plans: list[WorkerPlan],
        pool: WorkerPool,
        spawn: Spawn,
        kill: Kill,
        restart: bool,
        ready_timeout_s: float,
        make_plan: MakePlan | None = None,
        drain_timeout_s: float = 120.0,
    ) -> None:
        self.plans = {plan.name: plan for plan in plans}
        self.targets = Counter(plan.role for plan in plans)
        self.pool = pool
        self.restart = restart
        self.restarts: Counter[str] = Counter()  # role -> workers replaced
        self._spawn = spawn
        self._kill = kill
        self._ready_timeout_s = ready_timeout_s
        self._incarnations = Counter[str]()  # name -> last incarnation started
        self._join_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._make_plan = make_plan
        self._drain_timeout_s = drain_timeout_s
        self._scaling: dict[str, asyncio.Lock] = {}
        # whether any request still uses a worker (the client sets it): draining waits on it
        self.in_use: Callable[[WorkerRef], bool] = lambda worker: False
        pool.on_death.append(self._on_death)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Every worker of the topology, started concurrently; decode joins before prefill."""
        plans = sorted(self.plans.values(), key=lambda p: p.role == "prefill")
        started = await asyncio.gather(
            *(self._start(plan, 0) for plan in plans), return_exceptions=True
        )
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            for ref in started:
                if isinstance(ref, WorkerRef):
                    self._kill(ref.actor)
            raise failed[0]
        for ref in started:
            await self._join(ref)

    async def aclose(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def every_actor(self) -> list[Any]:
        return [w.actor for w in (*self.pool.retired, *self.pool.workers.values())]

    # ------------------------------------------------------------------ health
    def recovering(self, role: str) -> bool:
        """Will a dead worker of ``role`` come back (so a request may wait for it)?"""
        return self.restart and not self._closing and len(self.pool.live(role)) < self.targets[role]

    def health(self) -> dict[str, PoolHealth]:
        return {role: PoolHealth(len(self.pool.live(role)), target)
                for role, target in self.targets.items()}  # fmt: skip

    def kill(self, worker: WorkerRef, reason: str) -> None:
        """Take a live worker out (hung, unhealthy): its requests move, a new one replaces it."""
        self.pool.mark_dead(worker, reason)

    # ------------------------------------------------------------------ scaling
    def scale(self, role: str, replicas: int) -> None:
        """Set a pool's target while serving; workers start or drain in the background."""
        if role not in self.targets:
            raise KeyError(f"no pool {role!r} (pools: {', '.join(sorted(self.targets))})")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        if self._make_plan is None:
            raise RuntimeError("this deployment cannot make new workers")
        self.targets[role] = replicas
        self._background(self._reconcile(role))

    async def _reconcile(self, role: str) -> None:
        async with self._scaling.setdefault(role, asyncio.Lock()):
            mine = sorted((p for p in self.plans.values() if p.role == role), key=_index)
            extra = len(mine) - self.targets[role]
            for plan in mine[len(mine) - extra:] if extra > 0 else []:
                del self.plans[plan.name]  # from now on nothing replaces it
                worker = self.pool.workers.get(plan.name)
                if worker is not None and worker.alive:
                    self._background(self._retire(worker))
                elif worker is not None:  # dead, and now not to be replaced
                    self.pool.remove(worker.name)
            starts = []
            used = {_index(p) for p in mine}
            for _ in range(-extra if extra < 0 else 0):
                index = next(i for i in range(len(used) + 1) if i not in used)
                used.add(index)
                plan = self._make_plan(role, index)
                self.plans[plan.name] = plan
                starts.append(self._add(plan))
            await asyncio.gather(*starts)

    async def _add(self, plan: WorkerPlan) -> None:
        await self._bring_up(plan, lambda: plan.name in self.plans, "starting")

    async def _retire(self, worker: WorkerRef) -> None:
        worker.draining = True
        self.pool.changed.set()
        deadline = asyncio.get_running_loop().time() + self._drain_timeout_s
        while self.in_use(worker) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if worker.alive:
            with contextlib.suppress(Exception):  # closes its NIXL agent and sockets cleanly
                await asyncio.wait_for(self.pool.call(worker, "shutdown"), SHUTDOWN_TIMEOUT_S)
        # what still runs there (past the drain timeout) moves elsewhere, peers forget it
        self.pool.mark_dead(worker, RETIRED)
        self.pool.remove(worker.name)
        log.info("worker %s retired", worker.name)

    # ------------------------------------------------------------------ internals
    async def _start(self, plan: WorkerPlan, incarnation: int) -> WorkerRef:
        self._incarnations[plan.name] = incarnation
        actor = self._spawn(plan, incarnation)
        try:
            info = await asyncio.wait_for(actor.call.remote("ready"), self._ready_timeout_s)
        except BaseException:
            self._kill(actor)
            raise
        return WorkerRef(
            name=plan.name, role=plan.role, actor=actor, num_blocks=info["num_blocks"],
            block_size=info["block_size"], kv_address=info.get("kv_address"),
            bytes_per_block=info.get("bytes_per_block", 0), incarnation=incarnation,
            pid=info.get("pid"),
        )  # fmt: skip

    async def _join(self, worker: WorkerRef) -> None:
        async with self._join_lock:
            if worker.role == "decode":
                for prefill in self.pool.live("prefill"):
                    with contextlib.suppress(WorkerUnavailable):  # it is being replaced too
                        await self.pool.call(prefill, "connect", worker.name, worker.kv_address)
            elif worker.role == "prefill":
                for decode in self.pool.live("decode"):
                    await self.pool.call(worker, "connect", decode.name, decode.kv_address)
            self.pool.add(worker)
        log.info("worker %s (incarnation %d, pid %s) joined", worker.name, worker.incarnation,
                 worker.pid)  # fmt: skip

    def _on_death(self, worker: WorkerRef) -> None:
        with contextlib.suppress(Exception):
            self._kill(worker.actor)  # hung or unhealthy: make sure it does nothing more
        if worker.role == "decode":
            for prefill in self.pool.live("prefill"):
                self._background(self._forget(prefill, worker.name))
        if self.restart and not self._closing and worker.name in self.plans:
            self._background(self._replace(worker))

    async def _forget(self, prefill: WorkerRef, decode_name: str) -> None:
        with contextlib.suppress(WorkerUnavailable):
            await self.pool.call(prefill, "forget", decode_name)

    async def _replace(self, dead: WorkerRef) -> None:
        plan = self.plans[dead.name]

        def still_dead() -> bool:  # not retired, not replaced already
            return dead.name in self.plans and self.pool.workers.get(dead.name) is dead

        if await self._bring_up(plan, still_dead, "replacing"):
            self.restarts[plan.role] += 1

    async def _bring_up(self, plan: WorkerPlan, wanted: Callable[[], bool], doing: str) -> bool:
        """Start the next incarnation of ``plan`` and join it, retried with backoff while
        ``wanted()``; True once one joined."""
        delay = FIRST_RETRY_S
        while not self._closing and wanted():
            incarnation = self._incarnations.get(plan.name, -1) + 1  # 0: the first
            try:
                worker = await self._start(plan, incarnation)
                try:
                    await self._join(worker)
                except BaseException:
                    self._kill(worker.actor)
                    raise
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s %s failed (%r); next try in %.1f s", doing, plan.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_S)
        return False

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _index(plan: WorkerPlan) -> int:
    return int(plan.name.rsplit("-", 1)[1])
