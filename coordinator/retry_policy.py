"""What to do with a request whose attempt failed: a pure function, tested with exact answers.

    failure without a fault (the request's own error, e.g. too long for a worker)   -> fail
    attempts used up (coordinator.retry.max_attempts; an attempt whose placement found a
    worker dead does not count)                                                     -> fail
    transfer failed / timed out, kv_transfer.on_failure:
        fail                                                                        -> fail
        recompute, and the decode worker of the attempt is alive                    -> recompute
        otherwise                                                                   -> retry
    anything else the system caused (a worker died, hung, failed its step ...)     -> retry

``retry`` places a new attempt afresh (route, reserve, prefill); ``recompute`` prefills the prompt
and the tokens so far on the attempt's decode worker itself. Either way, once tokens have been
streamed the new attempt resumes after them (a migration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coordinator.request_state import Attempt
from core.outputs import FAULT_TRANSFER_FAILED, FAULT_TRANSFER_TIMEOUT

TRANSFER_FAULTS = (FAULT_TRANSFER_FAILED, FAULT_TRANSFER_TIMEOUT)


@dataclass(frozen=True)
class Failure:
    message: str
    fault: str | None  # a core.outputs FAULT_*: the system's fault, retryable; None: the request's
    # False when placing it found a worker dead: the coordinator's view was stale, the request
    # lost nothing, and that worker is out of the running now (so this cannot repeat unbounded)
    counts: bool = True


@dataclass(frozen=True)
class Decision:
    action: Literal["retry", "recompute", "fail"]
    stage: str  # where the failed attempt was: queued, prefill, transfer, decode


def decide(
    failure: Failure,
    attempt: Attempt,
    num_attempts: int,
    max_attempts: int,
    on_transfer_failure: str,
) -> Decision:
    stage = attempt.stage
    if failure.fault is None or num_attempts >= max_attempts:
        return Decision("fail", stage)
    if failure.fault in TRANSFER_FAULTS:
        if on_transfer_failure == "fail":
            return Decision("fail", stage)
        if on_transfer_failure == "recompute" and attempt.decode is not None:
            if attempt.decode.alive:
                return Decision("recompute", stage)
    return Decision("retry", stage)
