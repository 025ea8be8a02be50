"""A worker that prefills and decodes its own requests: no KV transfer (colocated mode)."""

from __future__ import annotations

from engine.worker_base import WorkerBase


class ColocatedWorker(WorkerBase):
    role = "colocated"

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: dict) -> None:
        with self.lock:
            self.engine.add_request(request_id, list(prompt_token_ids), self.params_of(params))
        self.wake()

    def _iteration(self) -> bool:
        if not self.engine.has_unfinished():
            return False
        self.emit(self.engine.step())
        return True
