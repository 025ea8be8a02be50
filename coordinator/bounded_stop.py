"""Stopping that ends: each teardown step of ``tandem serve`` gets a time limit. A step past its
limit is logged with the stacks of the tasks still pending (what it waits on) and left behind,
instead of holding the process until someone kills it. (A CI run once saw a stop hang after a
worker had been replaced, with nothing in the log to say where.) A blocked event loop, or a hang
after it (``ray.shutdown``), is the job of the ``faulthandler`` watchdog that ``coordinator.launch``
arms when the stop begins: it prints every thread's stack.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable

log = logging.getLogger("tandem.launch")


async def step(what: str, awaitable: Awaitable[object], timeout_s: float) -> bool:
    """Await ``awaitable`` for up to ``timeout_s``; True if it finished (its error, if any, is
    raised). Past the limit it is cancelled without waiting for it, the pending tasks' stacks are
    logged, and False is returned."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        task.result()
        return True
    log.error("stopping: %s did not finish in %.0f s; going on without it. Pending tasks:\n%s",
              what, timeout_s, pending_stacks())  # fmt: skip
    task.cancel()
    return False


def pending_stacks(limit: int = 8) -> str:
    """The stack of every pending task of the running loop but the caller's (innermost
    ``limit`` frames each)."""
    out = io.StringIO()
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            task.print_stack(limit=limit, file=out)
    return out.getvalue()
