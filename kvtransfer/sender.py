"""KVSender: the prefill half of the hand-off. Backend-independent bookkeeping lives here.

Use (from a prefill worker's loop; every call but ``connect`` is non-blocking)::

    sender = make_sender(cache, config, model_id)      # registers the cache once
    peer = sender.connect("tcp://10.0.0.7:5600")       # once per decode worker: handshake
    sender.send(TransferSpec(rid, src_ids, dst_ids, tag), peer)
    for ev in sender.poll():                           # each loop iteration
        TransferDone   -> free the source blocks; ev.num_bytes / ev.seconds feed
                          tandem_kv_transfer_bytes_total / tandem_kv_transfer_seconds{backend}
        TransferFailed -> free the source blocks; the coordinator retries or recomputes
    sender.close()

Invariants: every ``send`` yields exactly one TransferDone or TransferFailed from a later
``poll`` (one per layer range when a request is sent in layer groups, see
``layout.split_layers``); the source blocks must stay untouched until then (FP8 staging copies
them at ``send`` time, but the plain path reads them during the WRITE). A transfer not done
``config.timeout_s`` after ``send`` fails and its handles and staging slots are released.
Request ids must be unique per attempt: a retry after TransferFailed uses a fresh id (or the
receiver's ``discard`` first), since the receiver counts landed layers per id.

What ``send`` costs the caller: nixl, ~0.1-1 ms (the WRITE is posted from a background thread);
tcp, one gather copy of the bytes (~50 ms per 256 MiB here); with FP8 staging, additionally the
quantization (``kernels.quantize_fp8``; seconds per 512 MiB with the CPU reference). Staging that
has to wait for free slots happens in a later ``poll``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine.kv_cache import KVCache
from kvtransfer.config import KVTransferConfig
from kvtransfer.layout import Desc, compatibility_problems, paired_descs
from kvtransfer.protocol import (
    Handshake,
    HandshakeRefused,
    KVLanded,
    ProtocolError,
    Region,
    TransferDone,
    TransferFailed,
    TransferSpec,
    encode,
)
from kvtransfer.regions import Fp8Staging, make_handshake, needs_fp8_staging
from kvtransfer.side_channel import request

log = logging.getLogger(__name__)

TransferEvent = TransferDone | TransferFailed


@dataclass
class Peer:
    address: str
    handshake: Handshake  # the decode side's
    sock: zmq.Socket  # DEALER on the peer's side channel
    fp8_staging: bool  # quantize before sending


@dataclass
class InFlight:
    spec: TransferSpec  # layer_end resolved
    peer: Peer
    started: float  # time.monotonic() at send()
    num_bytes: int = 0
    slots: list[int] = field(default_factory=list)  # FP8 staging slots held
    handle: Any = None  # backend's
    # blocks until the source data is computed (a CUDA event of the layer that wrote it, for a
    # group sent while prefill still runs); None: it is already
    ready: Callable[[], None] | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.peer.address, self.spec.request_id, self.spec.layer_start)


# (region name, source descriptors, destination descriptors), in the receiver's region order
DescPairs = list[tuple[str, list[Desc], list[Desc]]]


class KVSender(ABC):
    backend_name: str

    def __init__(self, cache: KVCache, config: KVTransferConfig, model_id: str):
        self.cache = cache
        self.config = config
        self._ctx = zmq.Context.instance()
        self._peers: dict[str, Peer] = {}
        self._inflight: dict[tuple[str, str, int], InFlight] = {}
        self._waiting: deque[InFlight] = deque()  # for FP8 staging slots
        self._events: list[TransferEvent] = []
        self._staging: Fp8Staging | None = None
        agent_name, metadata = self._open()
        self.handshake = make_handshake(cache, model_id, self.backend_name, agent_name, metadata)
        self._regions = {r.name: r for r in self.handshake.regions}

    # ---- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> tuple[str, bytes]:
        """Register the cache; return (agent name, agent metadata)."""

    @abstractmethod
    def _register_staging(self, staging: Fp8Staging) -> None: ...

    @abstractmethod
    def _link(self, peer: Peer) -> None:
        """Make ``peer`` writable (load its metadata)."""

    @abstractmethod
    def _unlink(self, peer: Peer) -> None:
        """Forget ``peer``'s metadata (after its transfers were finished)."""

    @abstractmethod
    def _post(self, t: InFlight, pairs: DescPairs, notif: bytes) -> Any:
        """Start the copy; return a handle. Raise on immediate failure."""

    @abstractmethod
    def _state(self, t: InFlight) -> str:
        """ "DONE", "PROC", or an error description. Must not block."""

    @abstractmethod
    def _release(self, t: InFlight) -> None: ...

    @abstractmethod
    def _shutdown(self) -> None: ...

    # ---- API -----------------------------------------------------------------------------
    def connect(self, address: str) -> str:
        """Handshake with the decode worker at ``address`` (blocking); returns the peer key for
        ``send``: the decode side's agent name, which is new with every incarnation of it. A new
        incarnation at a known address replaces the old one (``disconnect``), so nothing is ever
        written with a dead incarnation's metadata. Raises ConnectionRefusedError naming every
        mismatch."""
        sock, reply = request(
            self._ctx, address, encode(self.handshake), self.config.connect_timeout_s
        )
        if isinstance(reply, HandshakeRefused) or not isinstance(reply, Handshake):
            sock.close(linger=0)
            if isinstance(reply, HandshakeRefused):
                reasons = "; ".join(reply.reasons)
                raise ConnectionRefusedError(f"{address} refused the handshake: {reasons}")
            raise ProtocolError(f"{address} answered the handshake with {type(reply).__name__}")
        problems = compatibility_problems(self.handshake, reply)
        if problems:
            sock.close(linger=0)
            raise ConnectionRefusedError(f"incompatible peer {address}: " + "; ".join(problems))
        key = reply.agent_name
        if key in self._peers:  # the same incarnation again: already linked
            sock.close(linger=0)
            return key
        for old in [k for k, p in self._peers.items() if p.address == address]:
            self.disconnect(old)
        peer = Peer(address, reply, sock, needs_fp8_staging(self.handshake, reply))
        if peer.fp8_staging and self._staging is None:
            self._staging = Fp8Staging(self.cache.spec, self.config.staging_blocks,
                                       self.cache.data.device)  # fmt: skip
            self._register_staging(self._staging)
        self._link(peer)
        self._peers[key] = peer
        return key

    def disconnect(self, peer: str) -> None:
        """Forget a peer (it died, or a new incarnation replaced it): its transfers fail with
        TransferFailed, and its agent metadata is unloaded. Unknown keys are ignored."""
        p = self._peers.pop(peer, None)
        if p is None:
            return
        for t in [t for t in self._waiting if t.peer is p]:
            self._waiting.remove(t)
            self._finish(t, "peer disconnected")
        for t in [t for t in self._inflight.values() if t.peer is p]:
            self._finish(t, "peer disconnected")
        self._unlink(p)
        p.sock.close(linger=0)

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def send(
        self, spec: TransferSpec, peer: str, ready: Callable[[], None] | None = None
    ) -> None:
        """Start moving ``spec``'s blocks to ``peer``. Non-blocking; the outcome comes from
        ``poll``. ``ready`` blocks until the source data is computed (the copy waits for it).
        Raises (a caller bug) on an unknown peer or out-of-range block ids."""
        p = self._peers.get(peer)
        if p is None:
            raise KeyError(f"not connected to {peer!r}; call connect() first")
        num_layers = self.cache.spec.num_layers
        spec = dataclasses.replace(spec, layer_end=spec.layer_end or num_layers)
        _check_ids(spec.src_block_ids, self.cache.num_blocks, "source")
        _check_ids(spec.dst_block_ids, p.handshake.num_blocks, "destination")
        t = InFlight(spec, p, time.monotonic(), ready=ready)
        if t.key in self._inflight or any(w.key == t.key for w in self._waiting):
            raise ValueError(f"transfer {t.key} is already in flight")
        if p.fp8_staging and len(spec.src_block_ids) > self.config.staging_blocks:
            raise ValueError(
                f"{spec.request_id}: {len(spec.src_block_ids)} blocks exceed the FP8 staging "
                f"buffer ({self.config.staging_blocks} blocks); raise "
                "KVTransferConfig.staging_blocks to the longest prompt's block count"
            )
        # FIFO among transfers that need staging; a plain transfer never waits behind them
        if (p.fp8_staging and self._waiting) or not self._start(t):
            self._waiting.append(t)

    def poll(self) -> list[TransferEvent]:
        """Completed and failed transfers since the last call. Non-blocking."""
        now = time.monotonic()
        for t in list(self._inflight.values()):
            state = self._state(t)
            if state == "DONE":
                self._finish(t, None)
            elif state != "PROC":
                self._finish(t, state)
            elif now - t.started > self.config.timeout_s:
                self._finish(t, f"timed out after {self.config.timeout_s:.1f} s")
        while self._waiting and self._start(self._waiting[0]):
            self._waiting.popleft()
        for t in [t for t in self._waiting if now - t.started > self.config.timeout_s]:
            self._waiting.remove(t)
            self._finish(t, f"no FP8 staging space within {self.config.timeout_s:.1f} s")
        events, self._events = self._events, []
        return events

    @property
    def num_in_flight(self) -> int:
        return len(self._inflight) + len(self._waiting)

    def close(self) -> None:
        """Cancel what is in flight and release handles, registrations and sockets."""
        for t in list(self._inflight.values()):
            self._finish(t, "sender closed")
        self._waiting.clear()
        for p in self._peers.values():
            p.sock.close(linger=0)
        self._peers.clear()
        self._shutdown()

    # ---- internals -----------------------------------------------------------------------
    def _start(self, t: InFlight) -> bool:
        """Stage (FP8) and post ``t``; False if staging slots are short right now."""
        spec, p = t.spec, t.peer
        src_ids: list[int] | tuple[int, ...] = spec.src_block_ids
        src_regions: dict[str, Region] = self._regions
        if p.fp8_staging:
            assert self._staging is not None
            slots = self._staging.allocate(len(spec.src_block_ids))
            if slots is None:
                return False
            t.slots = slots
            if t.ready is not None:  # staging reads the source now
                t.ready()
                t.ready = None
            self._staging.stage(self.cache, list(spec.src_block_ids), slots,
                                spec.layer_start, spec.layer_end)  # fmt: skip
            src_ids, src_regions = slots, self._staging.regions
        pairs: DescPairs = []
        for dst in p.handshake.regions:
            s, d = paired_descs(
                src_ids,
                spec.dst_block_ids,
                src_regions[dst.name],
                dst,
                spec.layer_start,
                spec.layer_end,
                self.cache.spec.num_layers,
            )
            pairs.append((dst.name, s, d))  # fmt: skip
        t.num_bytes = sum(n for _, s, _ in pairs for _, n in s)
        notif = encode(KVLanded(spec.request_id, spec.tag, spec.layer_start, spec.layer_end))
        self._inflight[t.key] = t
        try:
            t.handle = self._post(t, pairs, notif)
        except Exception as e:  # e.g. the peer is already gone
            self._finish(t, f"{type(e).__name__}: {e}")
        return True

    def _finish(self, t: InFlight, error: str | None) -> None:
        self._inflight.pop(t.key, None)
        released = True
        if t.handle is not None:
            try:
                self._release(t)
            except Exception as e:  # a stuck handle must not stop the loop; it is logged
                log.warning("releasing %s failed: %s", t.key, e)
                released = False  # its staging slots may still be read: leak them too
            t.handle = None
        if t.slots and self._staging is not None and released:
            self._staging.free(t.slots)
            t.slots = []
        s = t.spec
        if error is None:
            seconds = time.monotonic() - t.started
            self._events.append(TransferDone(s.request_id, s.tag, self.backend_name, t.num_bytes,
                                             seconds, s.layer_start, s.layer_end or 0))  # fmt: skip
        else:
            log.warning("transfer %s to %s failed: %s", s.request_id, t.peer.address, error)
            self._events.append(TransferFailed(s.request_id, s.tag, self.backend_name, error))


def _check_ids(block_ids: tuple[int, ...], num_blocks: int, side: str) -> None:
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{side} block ids {bad[:8]} outside [0, {num_blocks})")
