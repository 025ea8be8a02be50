"""KV blocks from a prefill worker's cache into a decode worker's cache.

``make_sender`` / ``make_receiver`` pick a backend by name from ``BACKENDS`` (``nixl``: NIXL
WRITEs over UCX/RDMA/NVLink; ``tcp``: the same over ZMQ). Nothing falls back silently: an unknown
or unavailable backend is an error. See ``sender.py`` and ``receiver.py`` for the call pattern, and
``protocol.py`` for the messages (the coordinator may import ``kvtransfer.protocol`` alone: it does
not load torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kvtransfer.config import KVTransferConfig

if TYPE_CHECKING:
    from engine.kv_cache import KVCache
    from kvtransfer.receiver import KVReceiver
    from kvtransfer.sender import KVSender

# backend name -> ("module:SenderClass", "module:ReceiverClass"); imported on first use so that
# choosing tcp never imports nixl.
BACKENDS: dict[str, tuple[str, str]] = {
    "nixl": ("kvtransfer.nixl_backend:NixlSender", "kvtransfer.nixl_backend:NixlReceiver"),
    "tcp": ("kvtransfer.tcp_backend:TcpSender", "kvtransfer.tcp_backend:TcpReceiver"),
}


def _load(config: KVTransferConfig, side: int) -> type:
    try:
        target = BACKENDS[config.backend][side]
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {config.backend!r}; known: {sorted(BACKENDS)}"
        ) from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_sender(cache: KVCache, config: KVTransferConfig, model_id: str) -> KVSender:
    return _load(config, 0)(cache, config, model_id)


def make_receiver(cache: KVCache, config: KVTransferConfig, model_id: str) -> KVReceiver:
    return _load(config, 1)(cache, config, model_id)


__all__ = ["BACKENDS", "KVTransferConfig", "make_receiver", "make_sender"]
