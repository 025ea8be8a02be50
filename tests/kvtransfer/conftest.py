"""Fixtures for the KV-transfer tests: decode-side peers in their own processes, one per backend."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# This folder is named like the ``kvtransfer`` package (and tests/kernels like ``kernels``); with
# tests/ on sys.path they are namespace-package candidates, which lose to the real packages only
# if the repository root is on sys.path too (``pytest`` does not add the working directory).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
for _name in ("kvtransfer", "kernels"):
    if getattr(sys.modules.get(_name), "__file__", "") is None:  # a namespace stand-in
        del sys.modules[_name]
sys.path.insert(0, os.path.dirname(__file__))  # kv_peer must import by name in spawned children

from kv_peer import CacheShape, Peer  # noqa: E402

BACKENDS = ["nixl", "tcp"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def bf16_peer(backend: str) -> Iterator[Peer]:
    peer = Peer(CacheShape(dtype="bfloat16"), backend)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def fp8_peer(backend: str) -> Iterator[Peer]:
    peer = Peer(CacheShape(dtype="fp8_e4m3"), backend)
    yield peer
    peer.stop()
