"""Helpers for workers run in this process: their specs, the coordinator's hand-off, and
collecting what they stream."""

from __future__ import annotations

import itertools
import socket
import time

from core.delta_codec import decode_deltas

BLOCK = 4


def spec(
    name: str, model: str, out: str, backend: str = "nixl", transfer: dict | None = None,
    events: str | None = None, **engine,
) -> dict:  # fmt: skip
    """``events``: where the worker publishes its KV events (they are recorded only then)."""
    eng = dict(model=model, num_blocks=64, block_size=BLOCK, max_model_len=256, num_threads=1,
               record_kv_events=events is not None)  # fmt: skip
    return {"name": name, "engine": {**eng, **engine},
            "kv_transfer": {"backend": backend, **(transfer or {})},
            "output_address": out, "events_address": events}  # fmt: skip


def hand_off(decode, prefill, rid: str, prompt: list[int], params: dict,
             outputs: list[int] | None = None, peer: str = "decode-0") -> dict:  # fmt: skip
    """Reserve on the decode worker, then prefill into that reservation (what the coordinator
    does); the reservation ``{"block_ids", "num_cached"}``."""
    res = decode.reserve(rid, prompt, params, outputs)
    assert res is not None, f"no room for {rid}"
    prefill.prefill(rid, prompt, params, peer, res["block_ids"], outputs, res["num_cached"])
    return res


def tokens_of(deltas: list) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def _start(d) -> int:
    """Where ``d``'s first token sits in the output (the coordinator places deltas the same way)."""
    return d.num_output_tokens - len(d.token_ids)


def _complete(deltas: list, first: int) -> bool:
    """A finished delta came and every token from output position ``first`` up to it did too.
    A hand-off's first token comes from the prefill worker and the rest from the decode worker,
    over two sockets, so they may arrive in either order."""
    end = next((d for d in deltas if d.finished), None)
    if end is None:
        return False
    if end.error:  # a failure ends the request whatever is still in flight
        return True
    placed = sorted(deltas, key=_start)
    return _start(placed[0]) == first and all(
        _start(b) == a.num_output_tokens for a, b in itertools.pairwise(placed)
    )


def collect(pull, ids: set[str], timeout: float = 60.0, first: int = 0) -> dict[str, list]:
    """Each request's deltas in output order, once each has finished. ``first``: the output
    position of their first new token (how many outputs a resumed request came with)."""
    out: dict[str, list] = {rid: [] for rid in ids}
    deadline = time.monotonic() + timeout
    while left := [rid for rid in ids if not _complete(out[rid], first)]:
        assert time.monotonic() < deadline, f"unfinished: {left}"
        if pull.poll(200):
            for d in decode_deltas(pull.recv()):
                out[d.request_id].append(d)
    return {rid: sorted(deltas, key=_start) for rid, deltas in out.items()}


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
