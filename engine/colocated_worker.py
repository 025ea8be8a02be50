"""A worker that prefills and decodes its own requests: no KV transfer (colocated mode)."""

from __future__ import annotations

from engine.worker_base import WorkerBase


class ColocatedWorker(WorkerBase):
    role = "colocated"

    add_request = WorkerBase.admit

    def _iteration(self) -> bool:
        return self.run_step()
