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
import contextlib
import logging

import zmq
import zmq.asyncio

from core.delta_codec import decode_deltas
from core.outputs import FINISH_ERROR, OutputDelta

log = logging.getLogger(__name__)


class TokenStream:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        # Unbounded: a PUSH that hits the high-water mark blocks the worker's engine loop, and
        # the frames are small (token ids); the queues below are drained by live requests.
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._queues: dict[str, asyncio.Queue[OutputDelta]] = {}
        self._reader: asyncio.Task | None = None
        self.num_dropped = 0  # deltas for requests that had already ended here
        self.num_malformed = 0

    def start(self) -> None:
        """Start the reader on the running loop (idempotent)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="tokens")

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

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                deltas = decode_deltas(frame)
            except ValueError as exc:  # a bad frame must not stop every other request's tokens
                self.num_malformed += 1
                log.error("dropping a malformed token frame: %s", exc)
                continue
            for delta in deltas:
                queue = self._queues.get(delta.request_id)
                if queue is None:
                    self.num_dropped += 1
                else:
                    queue.put_nowait(delta)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._sock.close(linger=0)
        self._ctx.term()
