"""A thread that posts NIXL WRITEs so that ``KVSender.send`` never waits for the copy.

With UCX on host memory the copy is CMA (``process_vm_writev``) done INSIDE ``transfer()``:
~50-100 ms for 256 MiB here. The binding releases the GIL for it (measured: the calling
process's other thread kept running at 1 ms ticks throughout), so posting from one background
thread lets the worker loop compute while the kernel copies on the other core. The agent must then
be created with ``NIXL_THREAD_SYNC_RW``: with STRICT every agent call from the worker waits for
the running post (measured 50-70 ms stalls); with RW they proceed (0.1 ms).

On RDMA / NVLink ``transfer()`` only posts and returns at once; the thread costs nothing there.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class PostJob:
    xfer: Any  # nixl_xfer_handle, created (initialize_xfer) by the caller
    ready: Callable[[], None] | None = None  # waited for before posting (source computed)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    cancelled: bool = False
    error: str | None = None  # set when the post failed


class Poster:
    def __init__(self, agent: Any, name: str):
        self._agent = agent
        self._jobs: queue.SimpleQueue[PostJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, xfer: Any, ready: Callable[[], None] | None = None) -> PostJob:
        job = PostJob(xfer, ready)
        self._jobs.put(job)
        return job

    def cancel(self, job: PostJob, wait_s: float) -> bool:
        """Stop ``job`` from being posted, or wait (up to ``wait_s``) for a post under way.
        True when the handle is safe to release."""
        with job.lock:
            if not job.started:
                job.cancelled = True
                return True
        return job.done.wait(wait_s)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with job.lock:
                if job.cancelled:
                    job.done.set()
                    continue
                job.started = True
            try:
                if job.ready is not None:  # e.g. a CUDA event: the layers it copies are done
                    job.ready()
                if self._agent.transfer(job.xfer) == "ERR":
                    job.error = "NIXL refused to post the WRITE"
            except Exception as e:  # e.g. nixlRemoteDisconnectError: reported through poll()
                job.error = f"{type(e).__name__}: {e}"
            job.done.set()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():  # else the stuck post still uses the agent: keep it
            self._agent = None
