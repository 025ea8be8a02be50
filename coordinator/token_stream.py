"""The coordinator's end of the token stream: one ZMQ PULL socket, one reader task, one queue per
request.

Every worker PUSHes ``core.delta_codec`` frames (one per engine step) to ``address``. The reader
decodes each frame and puts every delta on the queue of its request (by wire id: one per attempt
of a request, so a failed attempt's late tokens never reach the next one). A delta for a request
that has no queue (it ended here first: stop string, client gone, a failed attempt) is dropped:
the worker has been told to abort it, and frames already on the wire may still arrive.

Invariant: a queue exists exactly between ``open(request_id)`` and ``close(request_id)``; the
caller opens it *before* asking any worker for the request, so no token can arrive unrouted.
"""

from __future__ import annotations

import asyncio

from coordinator.pull_socket import PullSocket
from core.delta_codec import decode_deltas
from core.outputs import FINISH_ERROR, OutputDelta


class TokenStream(PullSocket):
    reader_name = "tokens"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._queues: dict[str, asyncio.Queue[OutputDelta]] = {}
        self.num_dropped = 0  # deltas for requests that had already ended here

    def open(self, request_id: str) -> asyncio.Queue[OutputDelta]:
        if request_id in self._queues:
            raise ValueError(f"request {request_id!r} already has a token queue")
        queue: asyncio.Queue[OutputDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def fail(self, request_id: str, message: str, fault: str | None = None) -> None:
        """An error delta from the coordinator's side (e.g. the request's worker died)."""
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(OutputDelta(request_id, (), finish_reason=FINISH_ERROR, error=message,
                                         fault=fault))  # fmt: skip

    @property
    def num_open(self) -> int:
        return len(self._queues)

    def on_frame(self, frame: bytes) -> None:
        for delta in decode_deltas(frame):
            queue = self._queues.get(delta.request_id)
            if queue is None:
                self.num_dropped += 1
            else:
                queue.put_nowait(delta)
