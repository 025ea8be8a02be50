"""KV events on the wire (workers -> coordinator): which full prefix blocks a worker's cache now
holds or no longer holds, by chained block hash (core/block_hash.py).

One msgpack frame per worker loop turn that had any: ``[VERSION, worker, incarnation,
[[kind, hash], ...]]`` with kind "stored" or "removed", in the order they happened. The
incarnation lets the coordinator drop a dead incarnation's late frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

VERSION = 1
KINDS = ("stored", "removed")


@dataclass(frozen=True)
class KVEvents:
    worker: str
    incarnation: int
    events: tuple[tuple[str, int], ...]


def encode_events(worker: str, incarnation: int, events: list[tuple[str, int]]) -> bytes:
    return msgpack.packb([VERSION, worker, incarnation, [list(e) for e in events]])


def decode_events(frame: bytes) -> KVEvents:
    """Raises ValueError on anything that is not a frame of this version."""
    try:
        version, worker, incarnation, rows = msgpack.unpackb(frame)
        events = tuple((str(kind), int(h)) for kind, h in rows)
    except Exception as exc:
        raise ValueError(f"malformed KV event frame: {exc}") from exc
    if version != VERSION:
        raise ValueError(f"KV event frame version {version!r}, expected {VERSION}")
    if any(kind not in KINDS for kind, _ in events):
        raise ValueError(f"unknown KV event kind in {events[:4]}")
    return KVEvents(str(worker), int(incarnation), events)
