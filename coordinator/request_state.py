"""Where each in-flight request is, and which worker holds KV blocks for it.

    QUEUED ──reserve──> QUEUED (decode holds dst blocks) ──prefill──> PREFILLING ──token 1──>
    DECODING ──last token──> DONE          (colocated: QUEUED ──add_request──> PREFILLING ...)

Holders: the decode (or colocated) worker from ``reserve`` until it finishes or is told to
abort; the prefill worker from ``prefill`` until it has sent token 1 and the KV (it then frees
its own blocks). The coordinator ends every request with ``workers_to_abort``: every holder
that has not itself finished the request. Actor calls still in flight (``pending``) are awaited
before aborting: calls to a threaded actor may run out of order, so an abort could otherwise
overtake the reserve it is meant to undo.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    QUEUED = "queued"  # waiting for a decode worker with room (coordinator side)
    PREFILLING = "prefilling"  # handed to prefill, token 1 not seen yet
    DECODING = "decoding"  # token 1 seen, the decode worker has it
    DONE = "done"


@dataclass
class RequestRecord:
    request_id: str
    num_prompt_tokens: int
    phase: Phase = Phase.QUEUED
    decode_worker: str | None = None  # the decode or colocated worker holding its blocks
    dst_block_ids: tuple[int, ...] = ()
    prefill_worker: str | None = None
    pending: list[asyncio.Future] = field(default_factory=list)  # actor calls not answered yet
    release: asyncio.Task | None = None  # the one cleanup task (abort and finish both join it)

    @property
    def holders(self) -> list[str]:
        return [w for w in (self.prefill_worker, self.decode_worker) if w is not None]

    def workers_to_abort(self, finished_by: str | None) -> list[str]:
        """``finished_by``: the worker whose delta ended the request normally (stop/length), or
        None when the coordinator ended it (stop string, client gone, timeout, error)."""
        if finished_by is None:
            return self.holders
        if finished_by == self.decode_worker:
            return []  # decode had the KV, so prefill's part was over
        # finished at token 1 on prefill: the decode reservation was never used
        return [w for w in self.holders if w != finished_by]

    def uses(self, worker: str) -> bool:
        return self.phase != Phase.DONE and worker in self.holders
