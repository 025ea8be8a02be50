"""Test-only fault injection: make a worker fail, hang or die at a chosen point of its work.

The coordinator arms faults on a live worker (``WorkerBase.arm_fault``) only when it was started
with ``TANDEM_FAULT_INJECTION=1`` (``POST /admin/faults``); normal serving refuses them. Each armed
fault fires once, the ``nth`` time its point is reached after arming, so tests are deterministic
instead of racing a ``kill`` against a sleep.

    point               reached                                                   role
    step                each engine step with a batch (prefill or decode)         any
    queued              a prompt handed to this worker (``prefill()``)            prefill
    mid_prefill         after a chunk of a prompt that still needs more chunks    prefill
    after_first_token   token 1 streamed, its KV not posted yet                   prefill
    mid_decode          each decode step                                          decode, colocated
    transfer            a KV send                                                 prefill

    A fault with ``request_id`` fires only where the point is reached for that request's attempt
    number ``attempt`` (wire id ``<request_id>~<attempt>``; ``attempt`` None: any of them). Armed
    on every worker of a pool, it fires on the worker the request went to, and the retry
    elsewhere passes.

    action   effect
    raise    the step raises: the worker fails that step's requests and goes on
    exit     the process ends at once (``os._exit``), like ``kill -9``
    hang     the process stops itself (SIGSTOP): alive but silent, like a wedged host
    drop     (transfer) never posted, source blocks freed: the KV is silently lost
    fail     (transfer) reported failed at once, as a refused WRITE is
    delay    (transfer) posted ``delay_s`` late
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

POINTS = ("step", "queued", "mid_prefill", "after_first_token", "mid_decode", "transfer")
PROCESS_ACTIONS = ("raise", "exit", "hang")
TRANSFER_ACTIONS = ("drop", "fail", "delay")


class InjectedFault(RuntimeError):
    """What ``raise`` raises: a step failure the worker must survive."""


@dataclass(frozen=True)
class Fault:
    point: str
    action: str
    nth: int = 1  # fires the nth time ``point`` is reached after arming
    delay_s: float = 0.0  # delay only
    request_id: str | None = None  # only for this request ...
    attempt: int | None = 0  # ... and this attempt of it (None: every attempt)

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"fault point must be one of {', '.join(POINTS)}: {self.point!r}")
        allowed = TRANSFER_ACTIONS if self.point == "transfer" else PROCESS_ACTIONS
        if self.action not in allowed:
            raise ValueError(
                f"fault action at {self.point} must be one of {', '.join(allowed)}: "
                f"{self.action!r}"
            )
        if isinstance(self.nth, bool) or not isinstance(self.nth, int) or self.nth < 1:
            raise ValueError(f"fault nth must be an integer >= 1, got {self.nth!r}")
        if self.attempt is not None and (
            isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 0
        ):
            raise ValueError(f"fault attempt must be an integer >= 0 or null: {self.attempt!r}")
        if self.delay_s < 0:
            raise ValueError(f"fault delay_s must be >= 0, got {self.delay_s}")

    def targets(self, request_ids: list[str]) -> bool:
        if self.request_id is None:
            return True
        if self.attempt is None:
            return any(rid.startswith(f"{self.request_id}~") for rid in request_ids)
        return f"{self.request_id}~{self.attempt}" in request_ids

    @classmethod
    def from_dict(cls, d: dict) -> Fault:
        unknown = set(d) - {"point", "action", "nth", "delay_s", "request_id", "attempt"}
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        return cls(**d)


class FaultPlan:
    """The faults armed on one worker, with how often each point has been reached since."""

    def __init__(self) -> None:
        self._armed: list[tuple[Fault, int]] = []  # (fault, hits so far)

    def arm(self, fault: Fault) -> None:
        self._armed.append((fault, 0))

    def reach(self, point: str, request_ids: Iterable[str] = ()) -> Fault | None:
        """Count one arrival at ``point`` (for ``request_ids``); the fault that fires now
        (disarmed), if any. Process actions are carried out here (``exit`` and ``hang`` do not
        return; ``raise`` raises)."""
        if not self._armed:
            return None
        ids = list(request_ids)
        fired = None
        still = []
        for fault, hits in self._armed:
            if fault.point != point or not fault.targets(ids):
                still.append((fault, hits))
            elif hits + 1 >= fault.nth and fired is None:
                fired = fault
            else:
                still.append((fault, hits + 1))
        self._armed = still
        if fired is not None and fired.action in PROCESS_ACTIONS:
            carry_out(fired)
        return fired


def carry_out(fault: Fault) -> None:
    if fault.action == "exit":
        os._exit(137)  # no cleanup, like SIGKILL
    if fault.action == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops; SIGCONT or SIGKILL ends it
        return
    raise InjectedFault(f"injected fault at {fault.point}")
