"""The ``nixl`` backend: one-sided WRITEs from the prefill cache into the decode cache.

Each side registers its cache tensors once (DRAM for CPU tensors, VRAM for CUDA ones). The
decode side's agent metadata travels in its Handshake over the ZMQ side channel; the prefill side
loads it and then WRITEs merged block runs straight into the reserved destination blocks, with a
``KVLanded`` notification that NIXL delivers after the data of that WRITE. Progress is polled
(``check_xfer_state`` / ``get_new_notifs``), never waited on; WRITEs are posted from one
background thread (``nixl_poster``) because on host memory UCX copies inside ``transfer()``.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from kvtransfer.config import KVTransferConfig
from kvtransfer.nixl_poster import Poster, PostJob
from kvtransfer.protocol import KVLanded, ProtocolError, decode
from kvtransfer.receiver import KVReceiver
from kvtransfer.regions import Fp8Staging, cache_tensors
from kvtransfer.sender import DescPairs, InFlight, KVSender, Peer

log = logging.getLogger(__name__)


def _new_agent(role: str, config: KVTransferConfig, shared: bool) -> Any:
    """``shared``: used from two threads (worker + poster), so reader-writer locked."""
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t  # only this backend

    sync = nixl_thread_sync_t.NIXL_THREAD_SYNC_RW if shared else None
    conf = nixl_agent_config(
        enable_prog_thread=config.nixl_progress_thread, backends=["UCX"], sync_mode=sync
    )
    return nixl_agent(f"tandem-{role}-{uuid.uuid4().hex[:12]}", conf)


_TEARDOWN_PROGRESS_S = 0.02


def _progress(agent: Any, seconds: float) -> None:
    """Let UCX finish what it has queued: error handling, endpoint closes."""
    end = time.monotonic() + seconds
    while True:
        agent.get_new_notifs()
        if time.monotonic() >= end:
            return
        time.sleep(0.001)


class NixlSender(KVSender):
    backend_name = "nixl"

    def _open(self) -> tuple[str, bytes]:
        self._agent = _new_agent("prefill", self.config, shared=True)
        self._poster = Poster(self._agent, f"nixl-post-{self._agent.name}")
        self._regs = [self._agent.register_memory(t) for t in cache_tensors(self.cache).values()]
        self._remote_names: dict[str, str] = {}
        return self._agent.name, self._agent.get_agent_metadata()

    def _register_staging(self, staging: Fp8Staging) -> None:
        self._regs += [
            self._agent.register_memory(t) for t in cache_tensors(staging.cache).values()
        ]

    def _link(self, peer: Peer) -> None:
        name = self._agent.add_remote_agent(peer.handshake.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self._remote_names[peer.handshake.agent_name] = name
        try:  # optional: saves the connection set-up on the first WRITE
            self._agent.make_connection(name)
        except Exception as e:
            log.debug("make_connection to %s: %s", peer.address, e)

    def _unlink(self, peer: Peer) -> None:
        name = self._remote_names.pop(peer.handshake.agent_name, None)
        if name is not None:
            try:
                self._agent.remove_remote_agent(name)
            except Exception as e:  # already gone on the NIXL side: nothing to forget
                log.debug("remove_remote_agent %s: %s", name, e)

    def _post(self, t: InFlight, pairs: DescPairs, notif: bytes) -> Any:
        regions = {r.name: r for r in t.peer.handshake.regions}
        dev = self.cache.data.get_device() if self.cache.data.is_cuda else 0
        mem = "VRAM" if self.cache.data.is_cuda else "DRAM"
        local = [(a, n, dev) for _, src, _ in pairs for a, n in src]
        remote = [(a, n, regions[name].device_id) for name, _, dst in pairs for a, n in dst]
        (remote_mem,) = {regions[name].mem_type for name, _, _ in pairs}
        handle = self._agent.initialize_xfer(
            "WRITE",
            self._agent.get_xfer_descs(local, mem),
            self._agent.get_xfer_descs(remote, remote_mem),
            self._remote_names[t.peer.handshake.agent_name],
            notif,
        )
        return self._poster.submit(handle, t.ready)

    def _state(self, t: InFlight) -> str:
        job: PostJob = t.handle
        if not job.done.is_set():
            return "PROC"
        if job.error is not None:
            return job.error
        try:
            return self._agent.check_xfer_state(job.xfer)
        except Exception as e:  # e.g. nixlRemoteDisconnectError when the decode side died
            return f"{type(e).__name__}: {e}"

    def _release(self, t: InFlight) -> None:
        job: PostJob = t.handle
        # A post under way is a copy in progress: wait for it (briefly: poll must not block)
        # before releasing the handle and the staging slots it reads. If it is stuck, both leak.
        if not self._poster.cancel(job, wait_s=1.0):
            raise RuntimeError("the WRITE is still being posted; its handle is leaked")
        self._agent.release_xfer_handle(job.xfer)

    def _shutdown(self) -> None:
        self._poster.close()
        # Without a progress thread the UCX worker runs only inside our calls. A peer's death
        # (its endpoint's error) and remove_remote_agent's endpoint close both complete in
        # progress; destroying the worker before they have trips UCX's
        # `ucs_arbiter_group_is_empty` assertion and aborts the process (seen in ~1 of 8
        # close() calls right after a peer died mid-transfer). get_new_notifs progresses it.
        _progress(self._agent, _TEARDOWN_PROGRESS_S)
        for name in self._remote_names.values():
            try:
                self._agent.remove_remote_agent(name)
            except Exception as e:
                log.debug("remove_remote_agent %s: %s", name, e)
        _progress(self._agent, _TEARDOWN_PROGRESS_S)
        for reg in self._regs:
            self._agent.deregister_memory(reg)
        self._regs, self._remote_names = [], {}
        self._agent = None  # the last reference (the poster dropped its own): destroys it


class NixlReceiver(KVReceiver):
    backend_name = "nixl"

    def _open(self) -> tuple[str, bytes]:
        self._agent = _new_agent("decode", self.config, shared=False)
        self._regs = [self._agent.register_memory(t) for t in cache_tensors(self.cache).values()]
        return self._agent.name, self._agent.get_agent_metadata()

    def _collect(self) -> None:
        for peer, messages in self._agent.get_new_notifs().items():
            for m in messages:
                try:
                    msg = decode(m)
                except ProtocolError as e:
                    log.warning("dropped a bad notification from %s: %s", peer, e)
                    continue
                if isinstance(msg, KVLanded):
                    self._deliver(msg)
                else:
                    log.warning("dropped an unexpected %s notification", type(msg).__name__)

    def _shutdown(self) -> None:
        for reg in self._regs:
            self._agent.deregister_memory(reg)
        self._regs = []
        self._agent = None  # the last reference: destroys the agent and its UCX workers
