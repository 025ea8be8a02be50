"""Routing policies: pure functions from load snapshots to the workers that serve a request.

Decode is picked first (the request's KV must fit there before prefill starts writing into it),
then prefill. A decode worker is *eligible* only if its free KV blocks hold the whole prompt:
the coordinator never over-commits, so ``None`` means "no room now, queue the request".

Every choice is deterministic given its inputs (ties broken by ``worker_id``), so policies are
tested with exact answers. ``round_robin`` carries its state in the caller's ``turn`` counter.
``kv_aware`` weighs what each worker already has cached of the prompt against its load, as
Dynamo's KV router does (the cached counts come from workers' KV events, coordinator/kv_index.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLoad:
    worker_id: str
    num_free_kv_blocks: int
    num_running_seqs: int
    num_used_kv_blocks: int = 0
    num_cached_blocks: int = 0  # of THIS prompt, in the worker's prefix cache


@dataclass(frozen=True)
class Weights:
    """``kv_aware``: cost = overlap x blocks to compute or receive + load x blocks of load."""

    overlap: float = 1.0
    load: float = 1.0


@dataclass(frozen=True)
class PrefillLoad:
    worker_id: str
    num_queued_tokens: int  # prompt tokens accepted but not yet prefilled
    num_running_seqs: int = 0
    num_cached_prefix_tokens: int = 0  # of THIS prompt, already in the worker's prefix cache


@dataclass(frozen=True)
class Route:
    prefill_worker_id: str | None  # None: colocated mode, the decode worker prefills too
    decode_worker_id: str


PickDecode = Callable[[Sequence[DecodeLoad], int, int, Weights], "str | None"]
PickPrefill = Callable[[Sequence[PrefillLoad], int, int, Weights], "str | None"]
NO_WEIGHTS = Weights()


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens."""
    assert num_tokens >= 0 and block_size >= 1
    return -(-num_tokens // block_size)


def _eligible(loads: Sequence[DecodeLoad], num_blocks: int) -> list[DecodeLoad]:
    return [load for load in loads if load.num_free_kv_blocks >= num_blocks]


def decode_least_loaded(
    loads: Sequence[DecodeLoad], num_blocks: int, turn: int, weights: Weights = NO_WEIGHTS
) -> str | None:
    """Most free KV blocks (fewest future preemptions), then fewest running sequences."""
    eligible = _eligible(loads, num_blocks)
    if not eligible:
        return None
    best = min(eligible, key=lambda w: (-w.num_free_kv_blocks, w.num_running_seqs, w.worker_id))
    return best.worker_id


def decode_round_robin(
    loads: Sequence[DecodeLoad], num_blocks: int, turn: int, weights: Weights = NO_WEIGHTS
) -> str | None:
    """The ``turn``-th eligible worker, in the order given."""
    eligible = _eligible(loads, num_blocks)
    return eligible[turn % len(eligible)].worker_id if eligible else None


def prefill_least_loaded(
    loads: Sequence[PrefillLoad], num_prompt_tokens: int, turn: int,
    weights: Weights = NO_WEIGHTS,
) -> str | None:
    """Least work ahead of this prompt's last token: queued tokens plus the part of this prompt
    that is not already cached there; then fewest running sequences."""
    if not loads:
        return None

    def key(w: PrefillLoad) -> tuple:
        uncached = num_prompt_tokens - min(w.num_cached_prefix_tokens, num_prompt_tokens)
        return (w.num_queued_tokens + uncached, w.num_running_seqs, w.worker_id)

    return min(loads, key=key).worker_id


def prefill_round_robin(
    loads: Sequence[PrefillLoad], num_prompt_tokens: int, turn: int,
    weights: Weights = NO_WEIGHTS,
) -> str | None:
    return loads[turn % len(loads)].worker_id if loads else None


def decode_kv_aware(
    loads: Sequence[DecodeLoad], num_blocks: int, turn: int, weights: Weights = NO_WEIGHTS
) -> str | None:
    """Lowest cost: the blocks it must receive (those of the prompt it has not cached) and the
    blocks it already has in use, weighted; then fewest running sequences. A worker needs room
    for the blocks it does not have cached."""

    def missing(w: DecodeLoad) -> int:
        return num_blocks - min(w.num_cached_blocks, num_blocks)

    eligible = [w for w in loads if w.num_free_kv_blocks >= missing(w)]
    if not eligible:
        return None

    def key(w: DecodeLoad) -> tuple:
        cost = weights.overlap * missing(w) + weights.load * w.num_used_kv_blocks
        return (cost, w.num_running_seqs, w.worker_id)

    return min(eligible, key=key).worker_id


def prefill_kv_aware(
    loads: Sequence[PrefillLoad], num_prompt_tokens: int, turn: int,
    weights: Weights = NO_WEIGHTS,
) -> str | None:  # fmt: skip
    """Lowest cost: the prompt tokens it would compute (uncached) and those queued, weighted."""
    if not loads:
        return None

    def key(w: PrefillLoad) -> tuple:
        uncached = num_prompt_tokens - min(w.num_cached_prefix_tokens, num_prompt_tokens)
        cost = weights.overlap * uncached + weights.load * w.num_queued_tokens
        return (cost, w.num_running_seqs, w.worker_id)

    return min(loads, key=key).worker_id


@dataclass(frozen=True)
class RoutingPolicy:
    name: str
    pick_decode: PickDecode
    pick_prefill: PickPrefill


# Keys must match core.config.RoutingPolicy (a test checks).
POLICIES: dict[str, RoutingPolicy] = {
    "least_loaded": RoutingPolicy("least_loaded", decode_least_loaded, prefill_least_loaded),
    "round_robin": RoutingPolicy("round_robin", decode_round_robin, prefill_round_robin),
    "kv_aware": RoutingPolicy("kv_aware", decode_kv_aware, prefill_kv_aware),
}


def route(
    policy: str,
    decode_loads: Sequence[DecodeLoad],
    prefill_loads: Sequence[PrefillLoad] | None,
    num_prompt_tokens: int,
    block_size: int,
    turn: int = 0,
    weights: Weights = NO_WEIGHTS,
) -> Route | None:
    """Pick (prefill, decode) for a prompt, or None if no decode worker has room for it.

    ``prefill_loads=None`` means colocated mode. An empty prefill list in disaggregated mode
    also gives None (no prefill worker alive): the caller queues or fails the request.
    """
    chosen = POLICIES[policy]
    num_blocks = blocks_for(num_prompt_tokens, block_size)
    decode_id = chosen.pick_decode(decode_loads, num_blocks, turn, weights)
    if decode_id is None:
        return None
    if prefill_loads is None:
        return Route(None, decode_id)
    prefill_id = chosen.pick_prefill(prefill_loads, num_prompt_tokens, turn, weights)
    return None if prefill_id is None else Route(prefill_id, decode_id)
