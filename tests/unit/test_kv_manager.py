"""KVManager, exactly: leases through every state, block ids and reference counts after each call,
and the invariant that every referenced block belongs to a lease."""

from __future__ import annotations

import pytest

from core.sampling_params import SamplingParams
from engine.block_pool import BlockPool
from engine.kv_manager import KVManager, LeaseState
from engine.sequence import Sequence

BS = 4


def manager(num_blocks: int = 8) -> KVManager:
    return KVManager(BlockPool(num_blocks, BS))


def seq(rid: str, n: int, base: int = 100) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), SamplingParams())


def test_reservation_lands_becomes_a_table_and_frees():
    kv = manager()
    assert kv.reserve("a", 3) == ([0, 1, 2], 0)
    assert kv.leases() == {"a": ("reserved", 3)}
    with pytest.raises(ValueError, match="duplicate"):
        kv.reserve("a", 1)
    assert kv.reserve("b", 6) is None  # can't now: nothing taken
    assert kv.num_used_blocks == 3
    table = kv.activate("a")
    assert table == [0, 1, 2] and kv.state("a") == LeaseState.ACTIVE
    s = seq("a", 12)
    s.block_ids = table  # the sequence uses the lease's list itself
    assert kv.allocate(s, 1) and s.block_ids == [0, 1, 2, 3]
    kv.check()
    assert kv.free("a") == 4
    assert s.block_ids == [] and kv.num_used_blocks == 0 and kv.leases() == {}
    assert kv.free("a") == 0  # idempotent
    kv.check()


def test_a_reservation_reuses_a_cached_prefix():
    kv = manager()
    a = seq("a", 9)
    kv.allocate(a, 3)
    kv.cache_full_blocks(a, 9)  # blocks 0 and 1 hold full, hashed prefix blocks
    kv.free("a")  # free, but still findable by their hashes
    assert kv.reserve("b", 3, a.token_ids) == ([0, 1, 3], 2)  # 2 cached, 1 fresh
    assert kv.num_hit_blocks == 2
    assert kv.reserve("c", 8, a.token_ids) is None  # not enough: the hits are given back
    assert kv.ref_counts[:4] == [1, 1, 0, 1]
    kv.check()


def test_quarantine_holds_blocks_until_landed_or_expired():
    kv = manager()
    kv.reserve("late", 2)
    kv.reserve("lost", 2)
    kv.quarantine("late", until=10.0)
    kv.quarantine("lost", until=20.0)
    assert kv.num_used_blocks == 4
    assert kv.expire(now=9.0) == []
    assert kv.settle("late") and kv.num_used_blocks == 2  # its WRITE landed
    assert not kv.settle("late")  # not quarantined any more
    assert kv.expire(now=20.0) == ["lost"] and kv.num_used_blocks == 0
    with pytest.raises(ValueError, match="expected reserved"):
        kv.quarantine("never", until=1.0)
    kv.check()


def test_sequence_tables_prefix_hits_trim_and_hand_over():
    kv = manager()
    a = seq("a", 9)
    assert kv.lookup_prefix(a) == 0 and a.block_ids == []
    assert kv.allocate(a, 3) and a.block_ids == [0, 1, 2]
    kv.cache_full_blocks(a, 9)  # blocks 0 and 1 are full and hashed
    b = seq("b", 9)  # the same tokens
    assert kv.lookup_prefix(b) == 2 and b.block_ids == [0, 1]
    assert kv.ref_counts[:3] == [2, 2, 1]
    assert kv.allocate(b, 2) and b.block_ids == [0, 1, 3, 4]
    kv.trim(b, 3)  # speculative lookahead rolled back
    assert b.block_ids == [0, 1, 3] and kv.ref_counts[4] == 0
    kv.check()
    kv.hand_over("a")  # prefill: a transfer reads a's blocks now
    assert kv.state("a") == LeaseState.SENDING
    with pytest.raises(ValueError, match="expected active"):
        kv.hand_over("a")
    kv.free("b")
    assert kv.ref_counts[:5] == [1, 1, 1, 0, 0]
    kv.free("a")
    assert kv.num_used_blocks == 0
    kv.check()


def test_a_second_table_for_one_request_is_refused():
    kv = manager()
    a = seq("a", 4)
    kv.allocate(a, 1)
    impostor = seq("a", 4)
    with pytest.raises(ValueError, match="another block table"):
        kv.allocate(impostor, 1)


def test_check_names_blocks_without_a_lease():
    pool = BlockPool(4, BS)
    kv = KVManager(pool)
    kv.reserve("a", 1)
    pool.allocate(1)  # behind the manager's back
    with pytest.raises(AssertionError, match=r"1: \(1, 0\)"):
        kv.check()
