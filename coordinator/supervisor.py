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


class Supervisor:
    def __init__(
        self,
        plans: list[WorkerPlan],
        pool: WorkerPool,
        spawn: Spawn,
        kill: Kill,
        restart: bool,
        ready_timeout_s: float,
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
        if self.restart and not self._closing:
            self._background(self._replace(worker))

    async def _forget(self, prefill: WorkerRef, decode_name: str) -> None:
        with contextlib.suppress(WorkerUnavailable):
            await self.pool.call(prefill, "forget", decode_name)

    async def _replace(self, dead: WorkerRef) -> None:
        plan = self.plans[dead.name]
        delay = FIRST_RETRY_S
        while not self._closing and self.pool.workers.get(dead.name) is dead:
            try:
                worker = await self._start(plan, self._incarnations[plan.name] + 1)
                try:
                    await self._join(worker)
                except BaseException:
                    self._kill(worker.actor)
                    raise
                self.restarts[plan.role] += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("replacing %s failed (%r); next try in %.1f s", dead.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_S)

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
