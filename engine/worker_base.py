"""What every worker actor shares: an EngineCore, a background loop, and the token stream out.

Workers are plain classes (tests construct them directly); the launcher wraps them with
``ray.remote(...)`` as threaded actors. Actor methods run on Ray's threads while ``_loop`` runs on
its own; ``self.lock`` serialises every touch of engine state, and a whole engine step runs under
it so that no block can be freed (and handed out again) while a forward pass writes into it.
"""

from __future__ import annotations

import logging
import threading
import traceback
from abc import ABC, abstractmethod

import zmq

from core.delta_codec import encode_deltas
from core.outputs import OutputDelta
from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from kvtransfer.config import KVTransferConfig

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.002  # loop nap when there is nothing to compute (transfers still get polled)


class WorkerBase(ABC):
    role: str = ""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name: str = spec["name"]
        self.engine = EngineCore(EngineConfig(**spec["engine"]))
        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._zmq = zmq.Context()
        self._out = self._zmq.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(spec["output_address"])
        self.loop_error: str | None = None
        self._setup()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ actor methods
    def ready(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "num_blocks": self.engine.block_pool.num_blocks,
            "block_size": self.engine.config.block_size,
            "kv_address": None,
        }

    def stats(self) -> dict:
        pool, sched = self.engine.block_pool, self.engine.scheduler
        return {
            "name": self.name,
            "role": self.role,
            "kv_blocks_used": pool.num_used_blocks,
            "kv_blocks_total": pool.num_blocks,
            "running": sched.num_running,
            "waiting": sched.num_waiting,
            "transfer_bytes": 0,
            "transfer_seconds": 0.0,
            "transfer_backend": None,
            "loop_error": self.loop_error,
            "spec": spec.metrics.to_dict() if (spec := self.engine.speculator) else None,
        }

    def abort(self, request_ids: list[str]) -> None:
        with self.lock:
            self._abort(request_ids)

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._close()
        self._out.close()
        self._zmq.term()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                with self.lock:
                    busy = self._iteration()
            except Exception:  # keep serving others; the coordinator sees it in stats()
                self.loop_error = traceback.format_exc()
                log.exception("%s: loop iteration failed", self.name)
                busy = False
            if not busy:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def emit(self, deltas: list[OutputDelta]) -> None:
        if deltas:
            self._out.send(encode_deltas(deltas))

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

    def _setup(self) -> None:  # noqa: B027 (optional hook)
        """Role-specific state, built before the loop thread starts."""

    def _close(self) -> None:  # noqa: B027 (optional hook)
        """Release role-specific resources (after the loop has stopped)."""
