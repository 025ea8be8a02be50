"""Routing policies over load snapshots: exact choices, including ties and full workers."""

from __future__ import annotations

import typing

import pytest

from coordinator.router import (
    POLICIES,
    DecodeLoad,
    PrefillLoad,
    Route,
    Weights,
    blocks_for,
    decode_kv_aware,
    decode_least_loaded,
    decode_round_robin,
    prefill_kv_aware,
    prefill_least_loaded,
    prefill_round_robin,
    route,
)
from core.config import RoutingPolicy

DECODE = (
    DecodeLoad("d0", num_free_kv_blocks=10, num_running_seqs=4),
    DecodeLoad("d1", num_free_kv_blocks=30, num_running_seqs=9),
    DecodeLoad("d2", num_free_kv_blocks=30, num_running_seqs=2),
    DecodeLoad("d3", num_free_kv_blocks=2, num_running_seqs=0),
)
PREFILL = (
    PrefillLoad("p0", num_queued_tokens=500),
    PrefillLoad("p1", num_queued_tokens=100, num_running_seqs=3),
    PrefillLoad("p2", num_queued_tokens=100, num_running_seqs=1),
)


def test_policy_names_match_config_schema():
    assert set(POLICIES) == set(typing.get_args(RoutingPolicy))


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (33, 1, 33)],
)
def test_blocks_for(num_tokens, block_size, expected):
    assert blocks_for(num_tokens, block_size) == expected


def test_decode_least_loaded():
    # d1 and d2 tie on free blocks; d2 runs fewer sequences.
    assert decode_least_loaded(DECODE, 1, 0) == "d2"
    # Only d1/d2 hold 11..30 blocks; a request needing 31 fits nowhere.
    assert decode_least_loaded(DECODE, 30, 0) == "d2"
    assert decode_least_loaded(DECODE, 31, 0) is None
    # Full tie: the lower worker id wins, whatever the input order.
    twins = (DecodeLoad("b", 5, 1), DecodeLoad("a", 5, 1))
    assert decode_least_loaded(twins, 1, 0) == "a"
    assert decode_least_loaded((), 1, 0) is None


def test_decode_round_robin_skips_workers_without_room():
    picks = [decode_round_robin(DECODE, 3, turn) for turn in range(5)]
    assert picks == ["d0", "d1", "d2", "d0", "d1"]  # d3 (2 free blocks) is never eligible
    assert [decode_round_robin(DECODE, 1, t) for t in range(4)] == ["d0", "d1", "d2", "d3"]
    assert decode_round_robin(DECODE, 100, 0) is None


def test_prefill_least_loaded():
    # p1 and p2 tie on queued tokens; p2 runs fewer sequences.
    assert prefill_least_loaded(PREFILL, 50, 0) == "p2"
    # A 450-token prefix hit on p0 makes its remaining work 500 + 50 < 100 + 500.
    cached = (PrefillLoad("p0", 500, num_cached_prefix_tokens=450), *PREFILL[1:])
    assert prefill_least_loaded(cached, 500, 0) == "p0"
    # A cached count larger than the prompt cannot make work negative.
    huge = (PrefillLoad("p0", 0, num_cached_prefix_tokens=10_000), PrefillLoad("p1", 0))
    assert prefill_least_loaded(huge, 10, 0) == "p0"
    assert prefill_least_loaded((), 10, 0) is None


def test_prefill_round_robin():
    assert [prefill_round_robin(PREFILL, 10, t) for t in range(4)] == ["p0", "p1", "p2", "p0"]
    assert prefill_round_robin((), 10, 0) is None


def test_route():
    # 40 tokens at block size 16 need 3 blocks: d0, d1, d2 qualify.
    assert route("least_loaded", DECODE, PREFILL, 40, 16) == Route("p2", "d2")
    assert route("round_robin", DECODE, PREFILL, 40, 16, turn=4) == Route("p1", "d1")
    # Colocated: no prefill pool.
    assert route("least_loaded", DECODE, None, 40, 16) == Route(None, "d2")
    # No decode room, or no live prefill worker: the caller must queue.
    assert route("least_loaded", DECODE, PREFILL, 16 * 31, 16) is None
    assert route("least_loaded", DECODE, (), 40, 16) is None


def test_kv_aware_weighs_cached_blocks_against_load():
    loads = (
        DecodeLoad("d0", num_free_kv_blocks=20, num_running_seqs=1, num_used_kv_blocks=10,
                   num_cached_blocks=8),
        DecodeLoad("d1", num_free_kv_blocks=28, num_running_seqs=1, num_used_kv_blocks=2),
    )  # fmt: skip
    # 10 blocks: d0 receives 2 and has 10 in use (12); d1 receives 10 and has 2 (12): a tie on
    # cost and running sequences, broken by id
    assert decode_kv_aware(loads, 10, 0) == "d0"
    assert decode_kv_aware(loads, 10, 0, Weights(overlap=2.0, load=1.0)) == "d0"  # 14 < 22
    assert decode_kv_aware(loads, 10, 0, Weights(overlap=0.5, load=1.0)) == "d1"  # 7 < 11
    # room counts only the blocks a worker lacks: d0 fits 27 (20 free + 8 cached), d1 does not
    tight = (loads[0], DecodeLoad("d1", 5, 0, 25))
    assert decode_kv_aware(tight, 27, 0) == "d0" and decode_kv_aware(tight, 29, 0) is None
    prefills = (PrefillLoad("p0", 100, num_cached_prefix_tokens=64), PrefillLoad("p1", 0))
    assert prefill_kv_aware(prefills, 80, 0) == "p1"  # 16 + 100 > 80 + 0
    assert prefill_kv_aware(prefills, 80, 0, Weights(overlap=4.0, load=1.0)) == "p0"  # 164 < 320
    assert route("kv_aware", loads, prefills, 160, 16) == Route("p1", "d0")
