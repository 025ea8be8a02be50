"""Fixed-size KV blocks: allocation, reference counts and hash-based reuse of full prefix blocks.

A block is *free* when no sequence references it (ref count 0). Free blocks wait in an LRU queue;
a free block that still holds a full, hashed prefix stays findable by its hash until it is handed
out again, at which point its hash is evicted. So the free queue is also the eviction order::

    free queue:  [least recently freed ... most recently freed]
    allocate():  takes from the left (evicting its cached hash, if any)
    free():      appends to the right (blocks of one sequence: its tail first, so that the
                 prefix — most likely to be shared again — is evicted last)

"Can't now" answers return None / False; misuse (double free, unknown id) raises.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from core.block_hash import hash_block

STORED, REMOVED = "stored", "removed"  # KV events: a full block became findable / stopped being


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ):
        """``record_events``: keep (STORED | REMOVED, hash) for every block hash that becomes
        findable or is evicted, for ``take_events`` (workers publish them to the router)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1: {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_of: dict[int, int] = {}  # block id -> hash of its (full) content
        self._block_of: dict[int, int] = {}  # hash -> block id
        self._events: list[tuple[str, int]] | None = [] if record_events else None

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (ref count 1 each), or None if fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict_hash(block_id)
            self.ref_counts[block_id] = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the free queue."""
        for block_id in reversed(block_ids):
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"unknown block id {block_id}")
            if self.ref_counts[block_id] <= 0:
                raise ValueError(f"double free of block {block_id}")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    # ------------------------------------------------------------------ prefix caching
    def lookup_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Take a reference on the longest run of cached full blocks that prefixes token_ids.

        At most ``(len(token_ids) - 1) // block_size`` blocks are returned, so at least one token
        is always left to compute (its logits are needed to sample the next token).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for start in range(0, (len(token_ids) - 1) // bs * bs, bs):
            h = hash_block(parent, token_ids[start : start + bs])
            block_id = self._block_of.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            parent = h
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1
        return hits

    def cache_full_blocks(
        self, token_ids: Sequence[int], block_ids: Sequence[int], block_hashes: list[int]
    ) -> None:
        """Hash and register the full blocks of a sequence that are not hashed yet.

        ``token_ids`` are the tokens whose KV is now in the cache, ``block_hashes`` the sequence's
        chain of hashes so far (one per already-registered block); it is extended in place.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(len(token_ids) // bs, len(block_ids))
        for i in range(len(block_hashes), num_full):
            parent = block_hashes[-1] if block_hashes else None
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block_hashes.append(h)
            block_id = block_ids[i]
            if block_id in self._hash_of or h in self._block_of:
                continue  # this content is cached already (first copy wins)
            self._hash_of[block_id] = h
            self._block_of[h] = block_id
            if self._events is not None:
                self._events.append((STORED, h))

    def reset_prefix_cache(self) -> None:
        if self._events is not None:
            self._events.extend((REMOVED, h) for h in self._block_of)
        self._hash_of.clear()
        self._block_of.clear()

    def take_events(self) -> list[tuple[str, int]]:
        """The KV events since the last call, in order (empty unless ``record_events``)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _evict_hash(self, block_id: int) -> None:
        h = self._hash_of.pop(block_id, None)
        if h is not None:
            del self._block_of[h]
            if self._events is not None:
                self._events.append((REMOVED, h))
