"""The one owner of a worker's KV blocks: a lease per request, and nothing else touches the pool.

Every allocation, hand-over and free goes through ``KVManager``, recorded as a lease keyed by
request id, so that the worker can say which requests hold blocks (``leases``) and end any of them
in whatever state it is in::

    reserve() ──> RESERVED ──activate()──> ACTIVE ──hand_over()──> SENDING ──free()──> gone
                     │    (decode: its KV     ▲  (scheduler: allocate,      (prefill: a transfer
                     │     landed)            │   prefix hits, trim)         reads them)
                     └──quarantine()──> QUARANTINED ──settle() / expire()──> gone
                        (a WRITE may still land in them: kept until it does or its deadline passes)

A lease's block list is the very list object its ``Sequence`` uses as block table
(``Sequence.block_ids``): the manager mutates it in place, so the two can never disagree, and a
freed lease leaves the sequence with an empty table. Only this class calls ``BlockPool``'s
allocate / free / lookup_prefix; "can't now" answers are None / False, misuse raises.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import StrEnum

from engine.block_pool import BlockPool
from engine.sequence import Sequence


class LeaseState(StrEnum):
    RESERVED = "reserved"  # decode: destination of a prefill worker's WRITE, not landed yet
    ACTIVE = "active"  # the block table of a sequence this engine computes
    SENDING = "sending"  # prefill: the source of an in-flight transfer
    QUARANTINED = "quarantined"  # given up, but a WRITE may still land: freed later


@dataclass
class Lease:
    state: LeaseState
    block_ids: list[int]
    expires_at: float = math.inf  # QUARANTINED: freed at this time.monotonic() at the latest


class KVManager:
    def __init__(self, pool: BlockPool):
        self._pool = pool
        self._leases: dict[str, Lease] = {}
        self.num_hit_blocks = 0  # blocks found in the prefix cache (cumulative)

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def block_size(self) -> int:
        return self._pool.block_size

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self._pool.num_used_blocks

    @property
    def ref_counts(self) -> list[int]:
        """A copy of every block's reference count (for inspection)."""
        return list(self._pool.ref_counts)

    def can_allocate(self, num_blocks: int) -> bool:
        return self._pool.can_allocate(num_blocks)

    def state(self, request_id: str) -> LeaseState | None:
        lease = self._leases.get(request_id)
        return None if lease is None else lease.state

    def leases(self) -> dict[str, tuple[str, int]]:
        """request id -> (state, number of blocks): what a coordinator audits."""
        return {rid: (lease.state.value, len(lease.block_ids)) for rid, lease in
                self._leases.items()}  # fmt: skip

    def check(self) -> None:
        """Every block's reference count equals the number of leases holding it (tests)."""
        held = Counter(b for lease in self._leases.values() for b in lease.block_ids)
        counts = self._pool.ref_counts
        wrong = {b: (counts[b], held[b]) for b in range(len(counts)) if counts[b] != held[b]}
        if wrong:
            raise AssertionError(f"block -> (ref count, leases holding it): {wrong}")

    # ------------------------------------------------------------------ decode reservations
    def reserve(
        self, request_id: str, num_blocks: int, token_ids: Seq[int] = ()
    ) -> tuple[list[int], int] | None:
        """Blocks for a KV that another worker will write: first the cached blocks that prefix
        ``token_ids`` (their KV is here already: nothing is written into them), then fresh ones,
        ``num_blocks`` in all. (block ids, how many were cached), or None if too few are free.
        """
        if request_id in self._leases:
            raise ValueError(f"duplicate request id {request_id!r}")
        hits = self._pool.lookup_prefix(token_ids) if token_ids else []
        fresh = self._pool.allocate(num_blocks - len(hits))
        if fresh is None:
            self._pool.free(hits)
            return None
        self.num_hit_blocks += len(hits)
        self._leases[request_id] = Lease(LeaseState.RESERVED, hits + fresh)
        return hits + fresh, len(hits)

    def activate(self, request_id: str) -> list[int]:
        """A reservation whose KV landed becomes a sequence's block table (returned)."""
        lease = self._expect(request_id, LeaseState.RESERVED)
        lease.state = LeaseState.ACTIVE
        return lease.block_ids

    def quarantine(self, request_id: str, until: float) -> None:
        """Give up a reservation a WRITE may still land in: freed by ``settle`` (it landed) or
        ``expire`` (``until`` passed), never handed out before."""
        lease = self._expect(request_id, LeaseState.RESERVED)
        lease.state, lease.expires_at = LeaseState.QUARANTINED, until

    def settle(self, request_id: str) -> bool:
        """The WRITE into a quarantined lease has landed: free it. False if not quarantined."""
        if self.state(request_id) != LeaseState.QUARANTINED:
            return False
        self.free(request_id)
        return True

    def expire(self, now: float) -> list[str]:
        """Free every quarantined lease whose deadline has passed; their request ids."""
        gone = [rid for rid, lease in self._leases.items()
                if lease.state == LeaseState.QUARANTINED and lease.expires_at <= now]  # fmt: skip
        for rid in gone:
            self.free(rid)
        return gone

    # ------------------------------------------------------------------ sequences
    def allocate(self, seq: Sequence, num_blocks: int) -> bool:
        """Append ``num_blocks`` fresh blocks to ``seq``'s table; False (nothing taken) if too
        few are free."""
        ids = self._pool.allocate(num_blocks)
        if ids is None:
            return False
        self._table(seq).extend(ids)
        return True

    def lookup_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks that prefix ``seq``'s tokens as its table; how many."""
        assert not seq.block_ids, f"{seq.request_id} already has blocks"
        hits = self._pool.lookup_prefix(seq.token_ids)
        if hits:
            self._table(seq).extend(hits)
            self.num_hit_blocks += len(hits)
        return len(hits)

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full blocks among ``seq``'s first ``num_tokens`` (KV computed) for reuse."""
        self._pool.cache_full_blocks(seq.token_ids[:num_tokens], seq.block_ids, seq.block_hashes)

    def take_events(self) -> list[tuple[str, int]]:
        """KV events (block hashes cached / evicted) since the last call (block_pool.py)."""
        return self._pool.take_events()

    def trim(self, seq: Sequence, num_blocks: int) -> None:
        """Give back the blocks of ``seq``'s table past its first ``num_blocks``."""
        table = seq.block_ids
        if len(table) > num_blocks:
            self._pool.free(table[num_blocks:])
            del table[num_blocks:]

    def hand_over(self, request_id: str) -> None:
        """Prefill: the request's blocks become a transfer's source; freed by ``free`` when it
        ends, whatever happens to the request meanwhile."""
        self._expect(request_id, LeaseState.ACTIVE).state = LeaseState.SENDING

    # ------------------------------------------------------------------ the end
    def free(self, request_id: str) -> int:
        """End the lease now (any state) and free its blocks; how many (0 if none)."""
        lease = self._leases.pop(request_id, None)
        if lease is None:
            return 0
        num = len(lease.block_ids)
        self._pool.free(lease.block_ids)
        lease.block_ids.clear()  # the sequence's table: it holds nothing any more
        return num

    # ------------------------------------------------------------------ internals
    def _table(self, seq: Sequence) -> list[int]:
        lease = self._leases.get(seq.request_id)
        if lease is None:
            lease = self._leases[seq.request_id] = Lease(LeaseState.ACTIVE, seq.block_ids)
        elif lease.block_ids is not seq.block_ids:
            raise ValueError(f"{seq.request_id}: a lease with another block table exists")
        return lease.block_ids

    def _expect(self, request_id: str, state: LeaseState) -> Lease:
        lease = self._leases.get(request_id)
        if lease is None or lease.state != state:
            have = None if lease is None else lease.state.value
            raise ValueError(f"{request_id}: lease is {have}, expected {state.value}")
        return lease
