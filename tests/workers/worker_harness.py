"""Helpers for workers run in this process: their specs, and collecting what they stream."""

from __future__ import annotations

import time

from core.delta_codec import decode_deltas

BLOCK = 4


def spec(
    name: str, model: str, out: str, backend: str = "nixl", transfer: dict | None = None,
    **engine,
) -> dict:  # fmt: skip
    eng = dict(model=model, num_blocks=64, block_size=BLOCK, max_model_len=256, num_threads=1)
    return {"name": name, "engine": {**eng, **engine},
            "kv_transfer": {"backend": backend, **(transfer or {})},
            "output_address": out}  # fmt: skip


def tokens_of(deltas: list) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def collect(pull, ids: set[str], timeout: float = 60.0) -> dict[str, list]:
    out: dict[str, list] = {rid: [] for rid in ids}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while done != ids:
        assert time.monotonic() < deadline, f"unfinished: {ids - done}"
        if pull.poll(200):
            for d in decode_deltas(pull.recv()):
                out[d.request_id].append(d)
                if d.finished:
                    done.add(d.request_id)
    return out


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


