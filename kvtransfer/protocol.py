"""Control-plane messages of the KV hand-off: torch-free frozen dataclasses, msgpack on the wire.

Every frame is ``msgpack([MAGIC, PROTOCOL_VERSION, kind, {field: value}])``. ``decode`` never
returns a half-valid object: a frame that is not msgpack, has the wrong magic or version, names an
unknown kind, or has missing / extra / mistyped fields raises ``ProtocolError`` with a message that
says which. Workers catch ``ProtocolError`` per frame, log it and carry on (a garbled frame from one
peer must not take down a worker that serves many).

Messages::

    Handshake        once per (prefill, decode) pair, each way: cache geometry, dtype, NIXL agent
                     name + metadata and the registered regions (base address, length, stride).
    HandshakeRefused the receiver's answer when the pair is incompatible; ``reasons`` names every
                     mismatch (see ``layout.compatibility_problems``).
    TransferSpec     one request's blocks: src_block_ids[i] -> dst_block_ids[i]; optionally only
                     layers [layer_start, layer_end) so transfer can overlap prefill compute.
    KVLanded         the notification the receiver gets after the data of one TransferSpec landed.
    TransferDone     sender side: one TransferSpec finished; bytes and seconds for the metrics.
    TransferFailed   sender side: it did not (peer gone, timeout, refused); handles were released.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = "tdkv"
PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that cannot be decoded into a known message of this protocol version."""


@dataclass(frozen=True)
class Region:
    """One registered memory region: the cache data tensor or its FP8 scales.

    ``bytes_per_block`` is the stride between blocks; ``bytes_per_layer`` the stride between
    layers inside a block (the cache is block-major, so a block is one contiguous run).
    """

    name: str  # "data" | "scales"
    base_addr: int
    length: int
    device_id: int
    mem_type: str  # "DRAM" | "VRAM"
    bytes_per_block: int
    bytes_per_layer: int


@dataclass(frozen=True)
class Handshake:
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: str  # a key of engine.kv_cache.KV_DTYPES, e.g. "bfloat16", "fp8_e4m3"
    scale_layout: str  # "none" | "per_token_head_f32" ([blocks, layers, 2, block_size, heads])
    num_blocks: int
    backend: str  # "nixl" | "tcp"
    agent_name: str
    agent_metadata: bytes
    regions: tuple[Region, ...]
    protocol_version: int = PROTOCOL_VERSION

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"handshake of {self.agent_name!r} has no region {name!r}")


@dataclass(frozen=True)
class HandshakeRefused:
    agent_name: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class TransferSpec:
    request_id: str
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    tag: str = ""
    layer_start: int = 0
    layer_end: int | None = None  # None: through the last layer

    def __post_init__(self) -> None:
        if len(self.src_block_ids) != len(self.dst_block_ids):
            raise ValueError(
                f"{self.request_id}: {len(self.src_block_ids)} source blocks but "
                f"{len(self.dst_block_ids)} destination blocks"
            )
        if not self.src_block_ids:
            raise ValueError(f"{self.request_id}: empty transfer")
        if self.layer_end is not None and not 0 <= self.layer_start < self.layer_end:
            raise ValueError(
                f"{self.request_id}: bad layer range {self.layer_start, self.layer_end}"
            )


@dataclass(frozen=True)
class KVLanded:
    request_id: str
    tag: str
    layer_start: int
    layer_end: int  # exclusive, resolved (never None on the wire)


@dataclass(frozen=True)
class TransferDone:
    request_id: str
    tag: str
    backend: str
    num_bytes: int
    seconds: float
    layer_start: int = 0
    layer_end: int = 0


@dataclass(frozen=True)
class TransferFailed:
    request_id: str
    tag: str
    backend: str
    reason: str


Message = Handshake | HandshakeRefused | TransferSpec | KVLanded | TransferDone | TransferFailed
MESSAGE_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (Region, Handshake, HandshakeRefused, TransferSpec, KVLanded, TransferDone,
              TransferFailed)
}  # fmt: skip


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_wire(x) for x in obj]
    return obj


def encode(msg: Message) -> bytes:
    kind = type(msg).__name__
    if kind not in MESSAGE_TYPES or kind == "Region":
        raise TypeError(f"not a protocol message: {type(msg)!r}")
    return msgpack.packb([MAGIC, PROTOCOL_VERSION, kind, _to_wire(msg)], use_bin_type=True)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` (as msgpack decoded it) against a field annotation and build tuples and
    nested dataclasses. Only the shapes used above are supported, on purpose."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {value!r} is not {hint}")
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected nil")
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, fields: Any, where: str) -> Any:
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: expected a map of fields, got {type(fields).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(map(str, fields)) - set(known))
    if extra:
        raise ProtocolError(f"{where}: unknown fields {extra}")
    kwargs = {}
    for name, f in known.items():
        if name not in fields:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _coerce(fields[name], hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{where}: {e}") from None


def decode(frame: bytes) -> Message:
    """bytes -> message; raises ProtocolError (never anything else) on a bad frame."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"not a msgpack frame ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, list) and len(obj) == 4 and obj[0] == MAGIC):
        raise ProtocolError(f"not a tandem KV-transfer frame (got {str(obj)[:80]!r})")
    _, version, kind, fields = obj
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None or cls is Region:
        raise ProtocolError(f"unknown message kind {kind!r}")
    return _build(cls, fields, kind)
