"""The ``tcp`` backend: the same semantics as ``nixl`` with the bytes carried by ZMQ.

For hosts without NIXL, chosen by configuration only. The sender gathers exactly the descriptor
runs a NIXL WRITE would read into one buffer per destination region and sends
``[TransferSpec, data bytes, (scale bytes)]`` on its DEALER; the receiver's side-channel thread
checks the lengths, scatters the bytes into the destination blocks, and only then queues the
``KVLanded`` for ``poll`` and acknowledges with ``TransferDone`` (or ``TransferFailed``).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import numpy as np
import torch
import zmq

from kvtransfer.layout import paired_descs
from kvtransfer.protocol import (
    KVLanded,
    Message,
    ProtocolError,
    TransferDone,
    TransferFailed,
    TransferSpec,
    decode,
    encode,
)
from kvtransfer.receiver import KVReceiver
from kvtransfer.regions import Fp8Staging, byte_view, cache_tensors
from kvtransfer.sender import DescPairs, InFlight, KVSender, Peer


class TcpSender(KVSender):
    backend_name = "tcp"

    def _open(self) -> tuple[str, bytes]:
        self._views = {n: byte_view(t) for n, t in cache_tensors(self.cache).items()}
        self._staging_views: dict[str, torch.Tensor] = {}
        self._acks: dict[tuple[str, str, int], str | None] = {}  # key -> None (done) | error
        return f"tandem-tcp-prefill-{uuid.uuid4().hex[:12]}", b""

    def _register_staging(self, staging: Fp8Staging) -> None:
        self._staging_views = {n: byte_view(t) for n, t in cache_tensors(staging.cache).items()}

    def _link(self, peer: Peer) -> None:
        pass

    def _unlink(self, peer: Peer) -> None:
        for key in [k for k in self._acks if k[0] == peer.address]:
            del self._acks[key]

    def _post(self, t: InFlight, pairs: DescPairs, notif: bytes) -> Any:
        if t.ready is not None:  # the gather below reads the source now
            t.ready()
        views = self._staging_views if t.slots else self._views
        regions = self._staging.regions if t.slots and self._staging else self._regions
        frames: list[Any] = [encode(t.spec)]
        for name, src, _ in pairs:
            base, view = regions[name].base_addr, views[name]
            if view.is_cuda:
                runs = [view[a - base : a - base + n] for a, n in src]
                frames.append(torch.cat(runs).cpu().numpy())  # [num_bytes]
            else:
                # numpy, not torch, for host bytes: torch's small uint8 copies wake its thread
                # pool and measured 30 ms per MiB on this 2-core machine; numpy is a memcpy.
                host = view.numpy()
                frames.append(np.concatenate([host[a - base : a - base + n] for a, n in src]))
        t.peer.sock.send_multipart(frames, copy=False)  # zero-copy: zmq holds the arrays
        return True

    def _state(self, t: InFlight) -> str:
        self._drain(t.peer)
        if t.key not in self._acks:
            return "PROC"
        error = self._acks[t.key]
        return "DONE" if error is None else error

    def _drain(self, peer: Peer) -> None:
        while True:
            try:
                frame = peer.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frame)
            except ProtocolError:
                continue  # a garbled ack is lost; the transfer then times out
            if isinstance(msg, TransferDone):
                self._acks[(peer.address, msg.request_id, msg.layer_start)] = None
            elif isinstance(msg, TransferFailed):
                # the receiver cannot know the layer range of a spec it failed to parse
                for key in [k for k in self._inflight if k[:2] == (peer.address, msg.request_id)]:
                    self._acks[key] = f"receiver: {msg.reason}"

    def _release(self, t: InFlight) -> None:
        self._acks.pop(t.key, None)

    def _shutdown(self) -> None:
        self._acks.clear()


class TcpReceiver(KVReceiver):
    backend_name = "tcp"

    def _open(self) -> tuple[str, bytes]:
        self._views = {n: byte_view(t) for n, t in cache_tensors(self.cache).items()}
        return f"tandem-tcp-decode-{uuid.uuid4().hex[:12]}", b""

    def _on_message(self, msg: Message, frames: list[zmq.Frame]) -> list[bytes] | None:
        if not isinstance(msg, TransferSpec):
            raise ProtocolError(f"unexpected {type(msg).__name__} on a tcp channel")
        spec = dataclasses.replace(msg, layer_end=msg.layer_end or self.cache.spec.num_layers)
        try:
            num_bytes = self._scatter(spec, frames)
        except ValueError as e:
            return [encode(TransferFailed(spec.request_id, spec.tag, "tcp", str(e)))]
        self._deliver(KVLanded(spec.request_id, spec.tag, spec.layer_start, spec.layer_end))
        done = TransferDone(spec.request_id, spec.tag, "tcp", num_bytes, 0.0, spec.layer_start,
                            spec.layer_end)  # fmt: skip
        return [encode(done)]

    def _scatter(self, spec: TransferSpec, frames: list[zmq.Frame]) -> int:
        regions = self.handshake.regions
        if len(frames) != len(regions):
            raise ValueError(f"{len(frames)} payload frames for {len(regions)} regions")
        plans = []
        for region, frame in zip(regions, frames, strict=True):
            ids = spec.dst_block_ids
            _, dst = paired_descs(ids, ids, region, region, spec.layer_start, spec.layer_end,
                                  self.cache.spec.num_layers)  # fmt: skip
            if sum(n for _, n in dst) != len(frame.buffer):
                raise ValueError(f"region {region.name!r}: {len(frame.buffer)} bytes, "
                                 f"expected {sum(n for _, n in dst)}")  # fmt: skip
            plans.append((region, frame, dst))
        # Check everything before writing anything: a bad message must not half-land.
        total = 0
        for region, frame, dst in plans:
            payload = np.frombuffer(frame.buffer, dtype=np.uint8)  # [num_bytes], read-only alias
            view, off = self._views[region.name], 0
            if view.is_cuda:
                staged = torch.from_numpy(payload.copy()).to(view.device)
                for a, n in dst:
                    start = a - region.base_addr
                    view[start : start + n].copy_(staged[off : off + n])
                    off += n
            else:
                host = view.numpy()  # see TcpSender._post for why numpy
                for a, n in dst:
                    start = a - region.base_addr
                    host[start : start + n] = payload[off : off + n]
                    off += n
            total += off
        return total

    def _shutdown(self) -> None:
        pass
