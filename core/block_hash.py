"""Identity of a full KV block: its tokens and everything before them, as a chained 64-bit hash.

Workers key their prefix caches by it and publish it (KV events); the coordinator computes the
same chain for a prompt to see which worker holds how much of it. So it must be the same in every
process and on every host: blake2b over the parent hash and the token ids, not Python's
``hash`` (whose value for other types depends on PYTHONHASHSEED and the Python build).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    data = struct.pack(f"<q{len(token_ids)}q", -1 if parent_hash is None else parent_hash,
                       *token_ids)  # fmt: skip
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def prefix_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """The chain hashes of the full blocks of ``token_ids`` (at most ``limit`` of them)."""
    num = len(token_ids) // block_size
    if limit is not None:
        num = min(num, limit)
    hashes: list[int] = []
    parent = None
    for i in range(num):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
