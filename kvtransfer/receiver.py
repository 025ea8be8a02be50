"""KVReceiver: the decode half of the hand-off. Backend-independent bookkeeping lives here.

Use (from a decode worker's loop)::

    receiver = make_receiver(cache, config, model_id)  # registers the cache, binds the channel
    receiver.address                                    # "tcp://host:port": give it to prefill
    receiver.handshake                                  # msgpack-able (protocol.encode)
    for request_id in receiver.poll():                  # each loop iteration, non-blocking
        ...                                             # its KV has landed: join the decode batch
    receiver.close()

Invariant: a request id comes out of ``poll`` only after every layer of every one of its blocks
has been written (the notification is sent by the writer after its data, and a request sent in
layer groups is reported once all of ``[0, num_layers)`` has landed). Handshakes are answered on
a side-channel thread, so ``connect`` from prefill works while this worker is busy.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

import zmq

from engine.kv_cache import KVCache
from kvtransfer.config import KVTransferConfig
from kvtransfer.layout import compatibility_problems
from kvtransfer.protocol import (
    Handshake,
    HandshakeRefused,
    KVLanded,
    Message,
    ProtocolError,
    decode,
    encode,
)
from kvtransfer.regions import make_handshake
from kvtransfer.side_channel import SideChannelServer

log = logging.getLogger(__name__)


class KVReceiver(ABC):
    backend_name: str

    def __init__(self, cache: KVCache, config: KVTransferConfig, model_id: str):
        self.cache = cache
        self.config = config
        agent_name, metadata = self._open()
        self.handshake = make_handshake(cache, model_id, self.backend_name, agent_name, metadata)
        self._lock = threading.Lock()
        self._landed: list[KVLanded] = []  # appended by the side-channel thread / backend
        self._layers: dict[str, set[int]] = {}  # request id -> layers landed so far
        self._tags: dict[str, str] = {}  # request id -> the non-empty tag of one of its groups
        self._server = SideChannelServer(config.host, config.port_range, self._on_frames)
        self.address = self._server.address
        self.port = self._server.port

    # ---- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> tuple[str, bytes]:
        """Register the cache; return (agent name, agent metadata)."""

    def _collect(self) -> None:  # noqa: B027 (optional hook: tcp delivers from its thread)
        """Move newly landed notifications into ``_deliver`` (called from ``poll``)."""

    def _on_message(self, msg: Message, frames: list[zmq.Frame]) -> list[bytes] | None:
        """A non-handshake side-channel message (side-channel thread)."""
        raise ProtocolError(f"unexpected {type(msg).__name__} on a {self.backend_name} channel")

    @abstractmethod
    def _shutdown(self) -> None: ...

    # ---- API -----------------------------------------------------------------------------
    def poll(self) -> list[str]:
        """Request ids whose KV has fully landed since the last call. Non-blocking."""
        return [request_id for request_id, _ in self.poll_landed()]

    def poll_landed(self) -> list[tuple[str, str]]:
        """(request id, tag) of each request whose KV has fully landed since the last call.

        The tag is the sender's ``TransferSpec.tag``; of a request sent in layer groups, the one
        non-empty tag among its groups (a prefill worker puts what decode needs to start, the
        token it sampled, on the group it sends last, and groups may land in any order).
        Non-blocking."""
        self._collect()
        with self._lock:
            landed, self._landed = self._landed, []
        ready = []
        num_layers = self.cache.spec.num_layers
        for n in landed:
            layers = self._layers.setdefault(n.request_id, set())
            layers.update(range(n.layer_start, n.layer_end))
            if n.tag:  # groups may land in any order: the one tag sent is kept
                self._tags[n.request_id] = n.tag
            if len(layers) == num_layers:
                del self._layers[n.request_id]
                ready.append((n.request_id, self._tags.pop(n.request_id, "")))
        return ready

    def discard(self, request_id: str) -> None:
        """Forget a partially landed request (aborted / to be retried elsewhere)."""
        self._layers.pop(request_id, None)
        self._tags.pop(request_id, None)

    def close(self) -> None:
        self._server.close()
        self._shutdown()

    # ---- internals -----------------------------------------------------------------------
    def _deliver(self, landed: KVLanded) -> None:
        with self._lock:
            self._landed.append(landed)

    def _on_frames(self, identity: bytes, frames: list[zmq.Frame]) -> list[bytes] | None:
        msg = decode(frames[0].bytes)
        if isinstance(msg, Handshake):
            problems = compatibility_problems(msg, self.handshake)
            if problems:
                log.warning("refused %s: %s", msg.agent_name, "; ".join(problems))
                return [encode(HandshakeRefused(self.handshake.agent_name, tuple(problems)))]
            return [encode(self.handshake)]
        return self._on_message(msg, frames[1:])
