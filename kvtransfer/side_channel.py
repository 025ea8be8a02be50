"""The ZMQ side channel: a receiver binds a ROUTER in a port range; senders connect DEALERs.

The receiver serves its side channel from a daemon thread so a prefill peer can handshake (and, on
the ``tcp`` backend, deliver blocks) while the decode worker's loop is busy in a forward pass. The
thread owns its socket (ZMQ sockets are not thread-safe); what it learns reaches the worker through
the ``Receiver`` object's locked queue, read by ``poll()``.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import zmq

from kvtransfer.protocol import ProtocolError, decode, encode

log = logging.getLogger(__name__)

ANY_HOST = ("0.0.0.0", "*")

# (sender identity, frames) -> reply frames or None. Must not raise for bad input: see serve().
FrameHandler = Callable[[bytes, list[zmq.Frame]], list[bytes] | None]


def bind_in_range(sock: zmq.Socket, host: str, port_range: tuple[int, int]) -> int:
    """Bind to the first free port in ``[lo, hi]`` (inclusive); ``(0, 0)`` lets the OS pick."""
    lo, hi = port_range
    if (lo, hi) == (0, 0):
        sock.bind(f"tcp://{host}:0")
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return int(endpoint.rsplit(":", 1)[1])
    for port in range(lo, hi + 1):
        try:
            sock.bind(f"tcp://{host}:{port}")
            return port
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
    raise OSError(f"no free side-channel port on {host} in [{lo}, {hi}]")


class SideChannelServer:
    """ROUTER socket + thread. ``handler`` runs on the thread for each multipart message."""

    def __init__(self, host: str, port_range: tuple[int, int], handler: FrameHandler):
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = bind_in_range(self._sock, host, port_range)
        # Bound to every interface: advertise this host's address, which peers can dial.
        reachable = socket.gethostbyname(socket.gethostname()) if host in ANY_HOST else host
        self.address = f"tcp://{reachable}:{self.port}"
        self._handler = handler
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"kv-side-{self.port}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            identity, *frames = self._sock.recv_multipart(copy=False)
            try:
                reply = self._handler(identity.bytes, frames)
            except ProtocolError as e:
                # A garbled or unknown frame is the peer's problem, never this worker's.
                log.warning("side channel %s: dropped bad frame: %s", self.address, e)
                continue
            except Exception:  # a bug in a handler must not silently kill the channel either
                log.exception("side channel %s: handler failed", self.address)
                continue
            if reply is not None:
                self._sock.send_multipart([identity.bytes, *reply])
        self._sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def request(
    ctx: zmq.Context, address: str, frame: bytes, timeout_s: float
) -> tuple[zmq.Socket, object]:
    """Open a DEALER to ``address``, send ``frame`` and wait for one decoded reply.

    Returns the socket (kept for later traffic) and the reply. Raises TimeoutError when the
    peer does not answer in time (closing the socket), ProtocolError on a garbled reply.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send(frame)
    if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        sock.close(linger=0)
        raise TimeoutError(f"no handshake answer from {address} within {timeout_s:.1f} s")
    try:
        return sock, decode(sock.recv())
    except ProtocolError:
        sock.close(linger=0)
        raise


__all__ = ["SideChannelServer", "bind_in_range", "request", "encode", "decode"]
