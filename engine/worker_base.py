"""What every worker actor shares: an EngineCore, a background loop, and the token stream out.

Workers are plain classes (tests construct them directly); the launcher wraps them with
``ray.remote(...)`` as threaded actors. Actor methods run on Ray's threads while ``_loop`` runs on
its own; ``self.lock`` serialises every touch of engine state, and a whole engine step runs under
it so that no block can be freed (and handed out again) while a forward pass writes into it.

A step that raises fails the requests of that step (each gets an error delta with ``fault`` set,
so the coordinator retries or migrates it, and its blocks are freed) and the loop goes on with the
rest: never an endless retry of the same step. After ``max_step_failures`` failed iterations in a
row the worker reports itself ``unhealthy`` and the coordinator replaces it.

The engine is built on the loop thread, so that only that thread ever runs torch's parallel ops.
OpenMP (libgomp) gives every thread that starts a parallel region a team of its own, and once a
process has more such threads than CPUs its barriers stop spinning and sleep at once: every op then
pays a futex wake-up. Built on the actor's thread and stepped on the loop thread, SmolLM2's int4
batch-1 step took 25 ms instead of 11-13 ms on 2 threads (2-vCPU AMD EPYC, same engine in one
process: ``bench/decode_step.py``'s loop on the main thread vs on a second thread). So actor
methods must only read and queue (no tensor work): one that ran a parallel op would start a
second team. Nothing enforces this; the served figures in docs/benchmarks.md would show it.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future

import torch
import zmq

from core.delta_codec import encode_deltas
from core.kv_events import encode_events
from core.outputs import FAULT_STEP_FAILED, FINISH_ERROR, OutputDelta
from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.faults import Fault, FaultPlan
from engine.kv_manager import KVManager, LeaseState
from engine.sequence import Sequence
from kvtransfer.config import KVTransferConfig

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.002  # loop nap when there is nothing to compute (transfers still get polled)
MAX_STEP_FAILURES = 3  # failed iterations in a row before the worker calls itself unhealthy


def layer_done(device: torch.device) -> Callable[[], None] | None:
    """What a transfer of the layers issued so far must wait for before reading them: on CUDA
    their kernels may still run (an event recorded now); on CPU they are done (None)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize


class WorkerBase(ABC):
    role: str = ""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name: str = spec["name"]
        self.incarnation: int = spec.get("incarnation", 0)
        self.engine: EngineCore  # built on the loop thread (see the module docstring), as is
        self.kv: KVManager  # the engine's
        self.lock = threading.RLock()
        self.faults = FaultPlan()
        self.max_step_failures: int = spec.get("max_step_failures", MAX_STEP_FAILURES)
        self.loop_error: str | None = None
        self.num_iterations = 0  # loop turns that computed something: progress, seen by stats
        self.num_step_failures = 0  # failed iterations in a row
        self._step_seqs: list[Sequence] = []  # the batch of the step under way
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._zmq = zmq.Context()
        self._out = self._zmq.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(spec["output_address"])
        self._events: zmq.Socket | None = None  # KV events for the router (core/kv_events.py)
        if spec.get("events_address"):
            self._events = self._zmq.socket(zmq.PUSH)
            self._events.setsockopt(zmq.LINGER, 0)
            self._events.connect(spec["events_address"])
        built: Future[None] = Future()
        config = EngineConfig(**spec["engine"])
        self._thread = threading.Thread(target=self._run, args=(config, built),
                                        name=f"{self.name}-loop", daemon=True)  # fmt: skip
        self._thread.start()
        try:
            built.result()  # what building the engine raised, raised here
        except BaseException:
            self._close_sockets()
            raise

    # ------------------------------------------------------------------ actor methods
    def ready(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "num_blocks": self.kv.num_blocks,
            "block_size": self.engine.config.block_size,
            "bytes_per_block": self.engine.kv_cache.spec.bytes_per_block(),
            "kv_address": None,
        }

    def stats(self) -> dict:
        sched = self.engine.scheduler
        return {
            "name": self.name,
            "role": self.role,
            "kv_blocks_used": self.kv.num_used_blocks,
            "kv_blocks_total": self.kv.num_blocks,
            "running": sched.num_running,
            "waiting": sched.num_waiting,
            "busy": sched.has_unfinished(),
            "iterations": self.num_iterations,
            "prefix_hit_tokens": self.kv.num_hit_blocks * self.engine.config.block_size,
            "unhealthy": self.num_step_failures >= self.max_step_failures,
            "transfer_bytes": 0,
            "transfer_seconds": 0.0,
            "transfer_backend": None,
            "loop_error": self.loop_error,
            "spec": spec.metrics.to_dict() if (spec := self.engine.speculator) else None,
        }

    def leases(self) -> dict[str, tuple[str, int]]:
        """request id -> (lease state, blocks) of every request holding blocks here."""
        with self.lock:
            return self.kv.leases()

    def abort(self, request_ids: list[str]) -> None:
        """End requests in whatever state they are; idempotent; emits nothing."""
        with self.lock:
            self._abort(request_ids)

    def arm_fault(self, fault: dict) -> None:
        """Test-only (engine/faults.py): the coordinator calls it only when fault injection was
        allowed at its start."""
        with self.lock:
            self.faults.arm(Fault.from_dict(fault))

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._close()
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._out.close()
        if self._events is not None:
            self._events.close()
        self._zmq.term()

    # ------------------------------------------------------------------ the loop
    def _run(self, config: EngineConfig, built: Future[None]) -> None:
        """The loop thread: build the engine and the role's parts, then loop."""
        try:
            self.engine = EngineCore(config)
            self.kv = self.engine.kv
            self._setup()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                with self.lock:
                    busy = self._iteration()
                if busy:
                    self.num_step_failures = 0
            except Exception as exc:
                self.loop_error = traceback.format_exc()
                log.exception("%s: loop iteration failed", self.name)
                self.num_step_failures += 1  # before the error deltas: stats then agree
                with self.lock:
                    self._fail_step(exc)
                busy = False
            self._publish_kv_events()
            if busy:
                self.num_iterations += 1
            else:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()

    def _publish_kv_events(self) -> None:
        if self._events is None:
            return
        with self.lock:
            events = self.kv.take_events()
        if events:
            self._events.send(encode_events(self.name, self.incarnation, events))

    def run_step(self) -> bool:
        """One engine step (decode and colocated workers); False if there was nothing to do."""
        rejected = self.engine.admit_structured()  # grammars compiled (or refused) meanwhile
        self.emit(rejected)
        batch = self.engine.schedule()
        if not batch:
            return bool(rejected)
        self._step_seqs = list(batch.seqs)
        ids = [s.request_id for s in batch.seqs]
        self.faults.reach("step", ids)
        if not batch.is_prefill:
            self.faults.reach("mid_decode", ids)
        self.emit(self.engine.run(batch))
        self._step_seqs = []
        return True

    def _fail_step(self, exc: Exception) -> None:
        """End the requests of the step that raised: their state may be half-updated, the
        other requests' is not. Each gets an error delta the coordinator can retry."""
        seqs, self._step_seqs = self._step_seqs, []
        if not seqs:
            return
        self._abort([s.request_id for s in seqs])
        message = f"{self.name}: engine step failed: {type(exc).__name__}: {exc}"
        self.emit([
            OutputDelta(s.request_id, (), finish_reason=FINISH_ERROR, error=message,
                        num_prompt_tokens=s.num_prompt_tokens,
                        num_output_tokens=s.num_output_tokens, fault=FAULT_STEP_FAILED)
            for s in seqs
        ])  # fmt: skip
        self.num_iterations += 1  # the step ended (badly): still progress

    def wake(self) -> None:
        self._wake.set()

    def emit(self, deltas: list[OutputDelta]) -> None:
        if deltas:
            self._out.send(encode_deltas(deltas))

    def admit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict,
        output_token_ids: Seq[int] = (),
    ) -> None:
        """Queue a request this worker prefills itself (decode and colocated workers);
        ``output_token_ids``: tokens already streamed for it (a resumed request)."""
        with self.lock:
            self.engine.add_request(
                request_id, list(prompt_token_ids), self.params_of(params), output_token_ids
            )
        self.wake()

    def kv_transfer_config(self) -> KVTransferConfig:
        """The spec's ``kv_transfer`` section (msgpack / JSON lists become tuples)."""
        kv = self.spec.get("kv_transfer", {})
        return KVTransferConfig(**{**kv, "port_range": tuple(kv.get("port_range", (0, 0)))})

    @staticmethod
    def params_of(params: dict | SamplingParams) -> SamplingParams:
        return params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params)

    @abstractmethod
    def _iteration(self) -> bool:
        """One turn of the loop, under the lock; True if it did work (loop again at once)."""

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)  # the coordinator asked: nothing to tell it back
        for rid in request_ids:  # blocks of a request the scheduler had already let go of
            if self.kv.state(rid) == LeaseState.ACTIVE:
                self.kv.free(rid)

    def _setup(self) -> None:  # noqa: B027 (optional hook)
        """Role-specific state, built before the loop thread starts."""

    def _close(self) -> None:  # noqa: B027 (optional hook)
        """Release role-specific resources (after the loop has stopped)."""
