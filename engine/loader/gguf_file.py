"""A GGUF file's metadata and tensors, read the way the loader needs them.

Why not ``gguf.GGUFReader``: it builds a numpy view per part of every metadata value, so the
tokenizer's ~100k strings cost ~3 s per load of SmolLM2's file (every engine a process builds,
every worker start). Here the metadata is one pass of ``struct.unpack_from`` over the mapped file
(~0.1 s) and the tensors are the same read-only numpy views of the mapping ``GGUFReader`` gives.
Format (little-endian GGUF v2 / v3, as llama.cpp writes it): "GGUF", version u32, tensor count
u64, key/value count u64; the key/value pairs (string key, u32 type, value; an array is its item
type u32, count u64 and the items); per tensor its name, u32 n_dims, u64 dims (innermost first),
u32 ggml type, u64 offset; then the data, from the next multiple of ``general.alignment`` (32 if
absent), each tensor at its offset.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# value type id -> struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_BOOL, _STRING, _ARRAY = 7, 8, 9
# ggml types stored as plain numbers (numpy dtype); the rest are blocks of bytes
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # numpy order (outermost first): numbers, or uint8 [..., row bytes] of blocks


@dataclass(frozen=True)
class GGUFFile:
    fields: dict[str, Any]  # key -> int / float / bool / str, or a list of them (arrays)
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        """Where the next n bytes start; past them afterwards."""
        start = self.pos
        if start + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF file at byte {start}")
        self.pos += n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS and item != _BOOL:  # numbers: one read for the whole array
                dtype = np.dtype(_SCALARS[item])
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")


def read_gguf(path: str | Path) -> GGUFFile:
    """The metadata and tensors of the GGUF file at ``path`` (tensor data memory-mapped)."""
    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    num_tensors, num_fields = cur.unpack("<Q"), cur.unpack("<Q")
    fields: dict[str, Any] = {}
    for _ in range(num_fields):
        key = cur.string()
        fields[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        infos.append((name, dims, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
    alignment = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // alignment) * alignment
    data = np.frombuffer(buf, np.uint8)  # read-only, like GGUFReader's memmap
    tensors = []
    for name, dims, kind, offset in infos:
        shape = list(reversed(dims))  # numpy order
        block, block_bytes = GGML_QUANT_SIZES[kind]
        # bytes of one innermost row: its values, or its blocks of `block` values
        row = dims[0] * block_bytes if kind in _PLAIN else dims[0] // block * block_bytes
        size = int(np.prod(shape[:-1], dtype=np.int64)) * row
        raw = data[start + offset : start + offset + size]
        if raw.size != size:
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        if kind in _PLAIN:
            array = raw.view(_PLAIN[kind]).reshape(shape)
        else:
            array = raw.reshape(*shape[:-1], row)
        tensors.append(GGUFTensor(name, kind, array))
    return GGUFFile(fields, tensors)
