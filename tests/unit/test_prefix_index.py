"""Prefix identity and the router's prefix index, exactly: stable chain hashes, KV event frames,
and the index's leading-block counts across incarnations."""

from __future__ import annotations

import pytest

from coordinator.kv_index import PrefixIndex
from core.block_hash import hash_block, prefix_hashes
from core.kv_events import KVEvents, decode_events, encode_events


def test_block_hashes_are_the_same_in_every_process():
    # blake2b, not hash(): these values may not change between runs, hosts or Python builds
    assert hash_block(None, [1, 2, 3, 4]) == -5847583744903468788
    assert prefix_hashes(list(range(10)), 4) == [3057940527715505467, 6604530233087639233]
    assert prefix_hashes(list(range(10)), 4, limit=1) == [3057940527715505467]
    assert hash_block(hash_block(None, [0, 1]), [2, 3]) != hash_block(None, [2, 3])  # chained


def test_event_frames_round_trip_and_refuse_garbage():
    frame = encode_events("decode-1", 2, [("stored", 5), ("removed", -7)])
    assert decode_events(frame) == KVEvents("decode-1", 2, (("stored", 5), ("removed", -7)))
    with pytest.raises(ValueError, match="malformed"):
        decode_events(b"\x00not msgpack")
    with pytest.raises(ValueError, match="unknown KV event kind"):
        decode_events(encode_events("d", 0, [("moved", 1)]))


def test_index_counts_leading_blocks_per_incarnation():
    index = PrefixIndex()
    a, b, c = prefix_hashes(list(range(12)), 4)
    index.apply(KVEvents("decode-0", 0, (("stored", a), ("stored", b), ("stored", c))))
    assert index.cached_blocks("decode-0", 0, [a, b, c]) == 3
    index.apply(KVEvents("decode-0", 0, (("removed", b),)))
    assert index.cached_blocks("decode-0", 0, [a, b, c]) == 1  # a gap ends the prefix
    assert index.cached_blocks("decode-0", 1, [a]) == 0  # another incarnation's cache
    assert index.cached_blocks("decode-9", 0, [a]) == 0
    index.apply(KVEvents("decode-0", 1, (("stored", c),)))  # the restarted worker starts empty
    assert index.cached_blocks("decode-0", 1, [a, b, c]) == 0 and index.num_blocks("decode-0") == 1
    index.apply(KVEvents("decode-0", 0, (("stored", a),)))  # a dead incarnation's late frame
    assert index.num_blocks("decode-0") == 1
    index.forget("decode-0")
    assert index.num_blocks("decode-0") == 0
