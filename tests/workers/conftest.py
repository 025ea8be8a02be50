"""Workers in this process (no Ray): a tiny random Llama, a PULL socket standing in for the
coordinator's token stream, and worker pairs (helpers: worker_harness.py)."""

from __future__ import annotations

import pytest
import zmq
from worker_harness import free_port, spec

from decode.worker import DecodeWorker
from engine.colocated_worker import ColocatedWorker
from prefill.worker import PrefillWorker
from tests.model.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=5))


def _pull_socket():
    """A bound PULL socket and its address (what a worker PUSHes to)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    yield pull, f"tcp://127.0.0.1:{port}"
    pull.close(0)
    ctx.term()


@pytest.fixture()
def sink():
    """Stands in for the coordinator's token stream."""
    yield from _pull_socket()


@pytest.fixture()
def events():
    """Stands in for the coordinator's KV event stream."""
    yield from _pull_socket()


@pytest.fixture()
def colocated(tiny_model, sink):
    worker = ColocatedWorker(spec("colo", tiny_model, sink[1]))
    yield worker
    worker.shutdown()


@pytest.fixture()
def pair(tiny_model, sink):
    """decode-0 on a fixed side-channel port, and a prefill worker connected to it."""
    port = free_port()
    transfer = {"port_range": [port, port], "timeout_s": 2.0}
    decode = DecodeWorker(spec("decode-0", tiny_model, sink[1], transfer=transfer))
    prefill = PrefillWorker(spec("prefill-0", tiny_model, sink[1], transfer=transfer))
    prefill.connect("decode-0", decode.ready()["kv_address"])
    workers = {"decode": decode, "prefill": prefill, "transfer": transfer}
    yield workers
    workers["prefill"].shutdown()
    workers["decode"].shutdown()
