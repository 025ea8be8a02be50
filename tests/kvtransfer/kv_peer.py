"""The decode side of the transfer tests, run in its own OS process (multiprocessing, spawn).

The test process is the prefill side. The peer owns a KVReceiver over a KVCache whose blocks are
poisoned (0xA5 bytes), answers "expect" commands with the bytes of the destination blocks taken
at the moment ``poll`` reported the request as landed, so a test can tell whether the
notification ever came before the data.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from typing import Any

SPAWN = mp.get_context("spawn")


@dataclass(frozen=True)
class CacheShape:
    num_layers: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 4
    dtype: str = "bfloat16"  # a key of engine.kv_cache.KV_DTYPES
    num_blocks: int = 48

    def make(self):  # -> KVCache (torch imported lazily: the parent imports this module too)
        from engine.kv_cache import KV_DTYPES, KVCache, KVCacheSpec

        spec = KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size,
                           KV_DTYPES[self.dtype])  # fmt: skip
        return KVCache(spec, self.num_blocks)


def block_bytes(cache: Any, block_ids: list[int]) -> tuple[bytes, bytes]:
    """(data bytes, scale bytes) of ``block_ids`` in order."""
    import torch

    ids = torch.tensor(block_ids)
    data = cache.data[ids].contiguous().view(torch.uint8).numpy().tobytes()
    scales = b"" if cache.scales is None else cache.scales[ids].contiguous().numpy().tobytes()
    return data, scales


def serve(shape: CacheShape, backend: str, model_id: str, cmds: Any, acks: Any, out: Any) -> None:
    import torch

    from kvtransfer import KVTransferConfig, make_receiver

    cache = shape.make()
    cache.data.view(torch.uint8).fill_(0xA5)  # poison: a block that never landed shows it
    if cache.scales is not None:
        cache.scales.fill_(-1.0)
    receiver = make_receiver(cache, KVTransferConfig(backend=backend), model_id)
    out.put(("ready", receiver.address, receiver.port))
    expected: dict[str, list[int]] = {}
    parent = os.getppid()
    try:
        while os.getppid() == parent:  # else the test process died (an abort): do not linger
            try:
                cmd = cmds.get_nowait()
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if cmd[0] == "expect":
                    expected[cmd[1]] = cmd[2]
                    acks.put(cmd[1])
                elif cmd[0] == "die":
                    os._exit(1)  # no cleanup: a crashed worker
                elif cmd[0] == "stop":
                    break
            for rid, tag in receiver.poll_landed():
                out.put(("landed", rid, tag, *block_bytes(cache, expected.pop(rid, []))))
            time.sleep(0.0005)
    finally:
        receiver.close()
        out.put(("closed",))


class Peer:
    """Handle on a running decode-side process."""

    def __init__(self, shape: CacheShape, backend: str, model_id: str = "test-model"):
        self.cmds, self.acks, self.out = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
        args = (shape, backend, model_id, self.cmds, self.acks, self.out)
        self.proc = SPAWN.Process(target=serve, args=args, daemon=True)
        self.proc.start()
        tag, self.address, self.port = self.out.get(timeout=60)
        assert tag == "ready"

    def expect(self, request_id: str, dst_block_ids: list[int]) -> None:
        """Register before sending, so the snapshot is taken when ``poll`` reports it."""
        self.cmds.put(("expect", request_id, dst_block_ids))
        assert self.acks.get(timeout=20) == request_id

    def landed(self, timeout: float = 20.0) -> tuple[str, bytes, bytes]:
        rid, _tag, data, scales = self.landed_with_tag(timeout)
        return rid, data, scales

    def landed_with_tag(self, timeout: float = 20.0) -> tuple[str, str, bytes, bytes]:
        kind, rid, tag, data, scales = self.out.get(timeout=timeout)
        assert kind == "landed"
        return rid, tag, data, scales

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=10)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.cmds.put(("stop",))
            self.proc.join(timeout=15)
        if self.proc.is_alive():
            self.kill()


def drain(sender: Any, count: int, timeout: float = 30.0) -> list:
    """Poll ``sender`` (a KVSender) until ``count`` events have come."""
    events: list = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events"
        events += sender.poll()
        time.sleep(0.0005)
    return events


def close_after_peer_deaths(backend: str, cycles: int) -> None:
    """Run in a child process (an abort must fail a test, not kill pytest): ``cycles`` times,
    land a transfer on a fresh peer, kill the peer, send once more, and close the sender as soon
    as that transfer has failed: a prefill worker shutting down just after its decode peer died."""
    from kvtransfer import KVTransferConfig, make_sender
    from kvtransfer.protocol import TransferDone, TransferFailed, TransferSpec

    shape = CacheShape()
    for _ in range(cycles):
        peer_proc = Peer(shape, backend)
        sender = make_sender(shape.make(), KVTransferConfig(backend=backend, timeout_s=3.0),
                             "test-model")  # fmt: skip
        try:
            peer = sender.connect(peer_proc.address)
            sender.send(TransferSpec("alive", (1, 2), (3, 4)), peer)
            assert isinstance(drain(sender, 1)[0], TransferDone)
            peer_proc.kill()
            sender.send(TransferSpec("orphan", tuple(range(40)), tuple(range(40))), peer)
            assert isinstance(drain(sender, 1)[0], TransferFailed)
        finally:
            sender.close()
            peer_proc.stop()
