"""Workers in this process (no Ray): a tiny random Llama, a PULL socket standing in for the
coordinator's token stream, and helpers to build specs and collect deltas."""

from __future__ import annotations

import time

import pytest
import zmq

from core.delta_codec import decode_deltas
from tests.model.conftest import save_tiny_llama

BLOCK = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=5))


@pytest.fixture()
def sink():
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    yield pull, f"tcp://127.0.0.1:{port}"
    pull.close(0)
    ctx.term()


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


