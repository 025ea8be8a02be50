"""Which worker holds which prompt prefixes: an index of full KV blocks by chained hash, kept
from the workers' KV events (core/kv_events.py), for ``routing: kv_aware`` and local prefill.

    worker loop turn: blocks cached / evicted --PUSH--> KVEventStream (one PULL socket)
                                                           -> PrefixIndex.apply
    placement: prefix_hashes(prompt) -> PrefixIndex.cached_blocks(worker, hashes)

The index is a hint, never a promise: a block may be evicted between the event and the request
(the worker then computes or receives that block after all). A new incarnation of a worker
starts with an empty cache, so its predecessor's entries are dropped, and a dead incarnation's
late frames are ignored.
"""

from __future__ import annotations

from coordinator.pull_socket import PullSocket
from core.kv_events import KVEvents, decode_events


class PrefixIndex:
    def __init__(self) -> None:
        self._held: dict[str, tuple[int, set[int]]] = {}  # worker -> (incarnation, hashes)

    def apply(self, batch: KVEvents) -> None:
        incarnation, hashes = self._held.get(batch.worker, (batch.incarnation, set()))
        if batch.incarnation < incarnation:
            return  # a dead incarnation's frame, still on the wire
        if batch.incarnation > incarnation:
            hashes = set()
        for kind, h in batch.events:
            if kind == "stored":
                hashes.add(h)
            else:
                hashes.discard(h)
        self._held[batch.worker] = (batch.incarnation, hashes)

    def forget(self, worker: str) -> None:
        """The worker died or left: its cache went with it."""
        self._held.pop(worker, None)

    def cached_blocks(self, worker: str, incarnation: int, hashes: list[int]) -> int:
        """How many leading blocks of a prompt (its chain ``hashes``) the worker holds."""
        held = self._held.get(worker)
        if held is None or held[0] != incarnation:
            return 0
        count = 0
        for h in hashes:
            if h not in held[1]:
                break
            count += 1
        return count

    def num_blocks(self, worker: str) -> int:
        held = self._held.get(worker)
        return 0 if held is None else len(held[1])


class KVEventStream(PullSocket):
    """The coordinator's end of the KV events: one PULL socket, one reader task."""

    reader_name = "kv-events"

    def __init__(self, index: PrefixIndex, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.index = index

    def on_frame(self, frame: bytes) -> None:
        self.index.apply(decode_events(frame))
