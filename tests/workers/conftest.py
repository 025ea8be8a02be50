"""Workers in this process (no Ray): a tiny random Llama and a PULL socket standing in for the
coordinator's token stream (helpers: worker_harness.py)."""

from __future__ import annotations

import pytest
import zmq

from tests.model.conftest import save_tiny_llama


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
