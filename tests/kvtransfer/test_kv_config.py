"""Backend registry, config validation and side-channel port-range binding (real sockets)."""

from __future__ import annotations

import pytest
import zmq

from kvtransfer import KVTransferConfig, make_receiver, make_sender
from kvtransfer.protocol import HandshakeRefused, encode
from kvtransfer.side_channel import SideChannelServer, bind_in_range, request


def test_unknown_backend_is_an_error_not_a_fallback():
    from kv_peer import CacheShape

    cache = CacheShape().make()
    needle = r"unknown KV transfer backend 'rdma'.*\['nixl', 'tcp'\]"
    for make in (make_sender, make_receiver):
        with pytest.raises(ValueError, match=needle):
            make(cache, KVTransferConfig(backend="rdma"), "m")


@pytest.mark.parametrize(
    "kw", [dict(port_range=(5000, 4000)), dict(port_range=(0, 5)), dict(timeout_s=0.0),
           dict(staging_blocks=0)]
)  # fmt: skip
def test_bad_config_is_refused(kw):
    with pytest.raises(ValueError):
        KVTransferConfig(**kw)


def test_bind_takes_the_next_free_port_in_the_range_and_fails_when_full():
    ctx = zmq.Context.instance()
    first = ctx.socket(zmq.ROUTER)
    port = first.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
    socks = [first]
    try:
        second = ctx.socket(zmq.ROUTER)
        socks.append(second)
        got = bind_in_range(second, "127.0.0.1", (port, port + 1))
        assert got == port + 1  # port is taken by `first`
        third = ctx.socket(zmq.ROUTER)
        socks.append(third)
        with pytest.raises(OSError, match=f"no free side-channel port on 127.0.0.1 in \\[{port}"):
            bind_in_range(third, "127.0.0.1", (port, port + 1))
    finally:
        for s in socks:
            s.close(linger=0)


def test_a_wildcard_bind_advertises_a_dialable_address():
    answer = encode(HandshakeRefused("server", ("just checking",)))
    server = SideChannelServer("0.0.0.0", (0, 0), lambda identity, frames: [answer])
    try:
        assert "0.0.0.0" not in server.address and server.address.endswith(f":{server.port}")
        sock, reply = request(zmq.Context.instance(), server.address, b"hello", timeout_s=10.0)
        sock.close(linger=0)
        assert reply == HandshakeRefused("server", ("just checking",))
    finally:
        server.close()
