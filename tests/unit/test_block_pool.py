"""BlockPool: exact block ids, ref counts, misuse errors, prefix-cache hits and LRU eviction."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool

BS = 4  # tokens per block in these tests


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_fresh_pool_hands_out_ids_in_order_and_reuses_freed_ones_last():
    pool = BlockPool(8, BS)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert (pool.num_free_blocks, pool.num_used_blocks) == (3, 5)
    # free() drops a sequence's tail first: [1, 0] joins the free queue as 0, then 1
    pool.free([1, 0])
    assert pool.num_free_blocks == 5
    assert pool.allocate(4) == [5, 6, 7, 0]
    assert pool.allocate(1) == [1]
    assert pool.num_free_blocks == 0
    assert pool.allocate(1) is None  # "can't now" is None, not an error
    assert pool.allocate(0) == []


def test_allocate_more_than_free_returns_none_and_changes_nothing():
    pool = BlockPool(4, BS)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [3]


def test_can_allocate():
    pool = BlockPool(5, BS)
    assert pool.can_allocate(5) and pool.can_allocate(0)
    assert not pool.can_allocate(6)
    pool.allocate(4)
    assert pool.can_allocate(1)
    assert not pool.can_allocate(2)


def test_ref_counts_and_free_only_at_zero():
    pool = BlockPool(4, BS)
    ids = pool.allocate(2)
    assert pool.ref_counts == [1, 1, 0, 0]
    pool.ref_counts[0] += 1  # a second holder (what a prefix hit does)
    pool.free(ids)
    assert pool.ref_counts == [1, 0, 0, 0]
    assert pool.num_free_blocks == 3  # block 0 still held
    pool.free([0])
    assert pool.ref_counts == [0, 0, 0, 0]
    assert pool.num_free_blocks == 4
    # free order: 2, 3 (never used), then 1, then 0
    assert pool.allocate(4) == [2, 3, 1, 0]


def test_double_free_and_unknown_ids_raise():
    pool = BlockPool(4, BS)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(ValueError, match="double free of block"):
        pool.free([ids[0]])
    with pytest.raises(ValueError, match="double free of block 3"):
        pool.free([3])  # never allocated
    with pytest.raises(ValueError, match="unknown block id 4"):
        pool.free([4])
    with pytest.raises(ValueError, match="unknown block id -1"):
        pool.free([-1])
    with pytest.raises(ValueError):
        pool.allocate(-1)
    with pytest.raises(ValueError):
        BlockPool(0, BS)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


def cached_sequence(pool: BlockPool, token_ids: list[int]) -> tuple[list[int], list[int]]:
    """Allocate blocks for token_ids and register its full blocks, as after a prefill."""
    ids = pool.allocate(-(-len(token_ids) // BS))
    hashes: list[int] = []
    pool.cache_full_blocks(token_ids, ids, hashes)
    return ids, hashes


def test_lookup_hits_exactly_the_cached_full_blocks():
    pool = BlockPool(16, BS)
    prompt = tokens(10)  # blocks: [100..103] [104..107] [108 109] (partial, never cached)
    ids, hashes = cached_sequence(pool, prompt)
    assert ids == [0, 1, 2]
    assert len(hashes) == 2
    # same 10 tokens: both full blocks hit, the partial third is computed again
    assert pool.lookup_prefix(prompt) == [0, 1]
    assert pool.ref_counts[:3] == [2, 2, 1]
    # a prompt sharing only the first block
    assert pool.lookup_prefix(tokens(4) + [7, 7, 7, 7, 7]) == [0]
    # differs in the first block: the chain hash makes the identical second block miss too
    assert pool.lookup_prefix([1] + tokens(9, 101)) == []
    # a longer prompt with the same prefix
    assert pool.lookup_prefix(tokens(20)) == [0, 1]
    assert pool.ref_counts[:3] == [4, 3, 1]


def test_lookup_never_covers_the_last_token():
    pool = BlockPool(16, BS)
    prompt = tokens(8)  # exactly two full blocks
    ids, _ = cached_sequence(pool, prompt)
    assert ids == [0, 1]
    # all 8 tokens cached, but the last one must be computed for its logits: 1 block only
    assert pool.lookup_prefix(prompt) == [0]
    assert pool.lookup_prefix(tokens(9)) == [0, 1]
    assert pool.lookup_prefix(tokens(4)) == []
    assert pool.lookup_prefix(tokens(5)) == [0]


def test_cache_full_blocks_extends_hash_chain_incrementally():
    pool = BlockPool(16, BS)
    ids = pool.allocate(3)
    hashes: list[int] = []
    pool.cache_full_blocks(tokens(3), ids, hashes)  # no full block yet
    assert hashes == []
    pool.cache_full_blocks(tokens(6), ids, hashes)
    assert len(hashes) == 1
    pool.cache_full_blocks(tokens(12), ids, hashes)
    assert len(hashes) == 3
    assert pool.lookup_prefix(tokens(13)) == ids
    # the same content in other blocks is not registered twice: the first copy keeps winning
    other = pool.allocate(2)
    pool.cache_full_blocks(tokens(8), other, [])
    assert pool.lookup_prefix(tokens(9)) == ids[:2]


def test_prefix_caching_disabled():
    pool = BlockPool(8, BS, enable_prefix_caching=False)
    ids, hashes = cached_sequence(pool, tokens(9))
    assert hashes == []
    assert pool.lookup_prefix(tokens(9)) == []
    assert pool.ref_counts[: len(ids)] == [1, 1, 1]


def test_hit_on_freed_cached_block_takes_it_off_the_free_queue():
    pool = BlockPool(4, BS)
    ids, _ = cached_sequence(pool, tokens(8))  # [0, 1]
    pool.free(ids)
    assert pool.num_free_blocks == 4
    assert pool.lookup_prefix(tokens(9)) == [0, 1]
    assert pool.ref_counts == [1, 1, 0, 0]
    assert pool.num_free_blocks == 2
    assert pool.allocate(3) is None
    assert pool.allocate(2) == [2, 3]  # not 0 or 1: they are held again


def test_eviction_is_lru_over_freed_blocks_tail_first():
    pool = BlockPool(6, BS)
    a_ids, _ = cached_sequence(pool, tokens(12, start=100))  # [0, 1, 2]
    b_ids, _ = cached_sequence(pool, tokens(12, start=500))  # [3, 4, 5]
    pool.free(a_ids)  # free queue: 2, 1, 0
    pool.free(b_ids)  # free queue: 2, 1, 0, 5, 4, 3
    # A was freed first, and its tail before its prefix: block 2 goes first
    assert pool.allocate(1) == [2]
    assert pool.lookup_prefix(tokens(13, start=100)) == [0, 1]  # block 2's hash was evicted
    pool.free([0, 1])  # back on the queue after 5, 4, 3: free queue 5, 4, 3, 1, 0
    assert pool.allocate(2) == [5, 4]
    assert pool.lookup_prefix(tokens(13, start=500)) == [3]  # B's tail is gone, its head is not
    assert pool.lookup_prefix(tokens(13, start=100)) == [0, 1]  # A's recently freed head kept
    assert pool.ref_counts == [1, 1, 1, 1, 1, 1]


def test_reallocated_block_loses_its_hash():
    pool = BlockPool(2, BS)
    ids, _ = cached_sequence(pool, tokens(8))
    pool.free(ids)
    assert pool.allocate(2) == [1, 0]
    assert pool.lookup_prefix(tokens(9)) == []
    pool.reset_prefix_cache()
    pool.free([0, 1])
    assert pool.num_free_blocks == 2


def test_kv_events_record_cached_and_evicted_hashes_in_order():
    from core.block_hash import prefix_hashes

    pool = BlockPool(3, 2, record_events=True)
    ids = pool.allocate(2)
    tokens = [5, 6, 7, 8]
    hashes: list[int] = []
    pool.cache_full_blocks(tokens, ids, hashes)
    assert hashes == prefix_hashes(tokens, 2)  # the coordinator computes the same chain
    assert pool.take_events() == [("stored", hashes[0]), ("stored", hashes[1])]
    assert pool.take_events() == []
    pool.free(ids)  # still cached: no event
    pool.allocate(3)  # every block handed out again: both hashes evicted
    assert sorted(pool.take_events()) == sorted([("removed", h) for h in hashes])
    assert BlockPool(2, 2).take_events() == []  # not recording
