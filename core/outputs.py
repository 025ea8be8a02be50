"""What flows back from the engine to a client: per-step deltas of one request."""

from __future__ import annotations

from dataclasses import dataclass, field

# finish reasons, as OpenAI names them ("abort", "error" and "rejected" are ours)
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"
# the engine refused the request's own input before generating (a structured-output spec that
# does not compile): the client's fault, answered with a 400 carrying ``error``
FINISH_REJECTED = "rejected"
FAILURES = (FINISH_ERROR, FINISH_ABORT, FINISH_REJECTED)

# Why the system (not the request) failed: set on an error delta, these let the coordinator retry
# or migrate the request instead of ending it.
FAULT_WORKER_DIED = "worker_died"  # its actor/process is gone
FAULT_WORKER_HUNG = "worker_hung"  # alive but no answer or no progress within the deadline
FAULT_WORKER_UNHEALTHY = "worker_unhealthy"  # kept failing its steps: taken out and restarted
FAULT_STEP_FAILED = "step_failed"  # an engine step raised; the worker failed its requests
FAULT_TRANSFER_FAILED = "transfer_failed"  # the KV send failed or timed out (sender side)
FAULT_TRANSFER_TIMEOUT = "transfer_timeout"  # token 1 came, the decode worker never took over
FAULT_PLACEMENT = "placement_failed"  # a worker call to place the request failed


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass(frozen=True)
class OutputDelta:
    """New tokens of one request since the previous delta.

    ``text`` is the newly detokenized text (never a broken UTF-8 sequence; held back until
    complete). ``finish_reason`` is set on the last delta only. Token counts let the front end
    build ``usage`` without re-tokenizing. ``stop_reason``: the stop string or stop token id that
    ended the request (None for EOS and length). ``num_cached_tokens``: prompt tokens found in
    the prefix cache, on the delta that carries token 1.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # first delta only; prompt positions 1..
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    stop_reason: str | int | None = None
    fault: str | None = None  # a FAULT_* on an error the system caused (retryable), else None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
