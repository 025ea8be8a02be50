"""A coordinator-side ZMQ PULL socket with one reader task: what the token stream and the KV
event stream share.

The socket binds a random port of ``host`` (workers PUSH to ``address``), with no receive
high-water mark (a PUSH at its mark would block a worker's engine loop; frames are small) and no
linger. The reader hands every frame to ``on_frame``; a frame it rejects with ``ValueError`` is
counted in ``num_malformed`` and dropped, so one bad frame never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)


class PullSocket(ABC):
    reader_name = "pull"  # the reader task's name, also in the malformed-frame log line

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._reader: asyncio.Task | None = None
        self.num_malformed = 0

    @abstractmethod
    def on_frame(self, frame: bytes) -> None:
        """Decode and apply one frame; raise ValueError for a malformed one."""

    def start(self) -> None:
        """Start the reader on the running loop (idempotent)."""
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read(), name=self.reader_name)

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                self.on_frame(frame)
            except ValueError as exc:
                self.num_malformed += 1
                log.error("%s: dropping a malformed frame: %s", self.reader_name, exc)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._sock.close(linger=0)
        self._ctx.term()
