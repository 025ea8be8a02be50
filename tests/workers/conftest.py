"""Fixtures of the in-process worker tests."""

from __future__ import annotations

import pytest
import zmq


@pytest.fixture()
def sink():
    """A PULL socket the workers push their token frames to: (socket, address)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    yield pull, f"tcp://127.0.0.1:{port}"
    pull.close(0)
    ctx.term()
