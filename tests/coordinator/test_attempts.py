"""Attempts of a request, exactly: who holds what in each phase, what each holder is told when an
attempt ends, and what the retry policy decides for each failure."""

from __future__ import annotations

import pytest

from coordinator.request_state import Phase, RequestRecord
from coordinator.retry_policy import Failure, decide
from coordinator.worker_pool import WorkerRef
from core.sampling_params import SamplingParams


def worker(name: str, alive: bool = True, death: str | None = None) -> WorkerRef:
    return WorkerRef(name, name.split("-")[0], None, 64, 16, alive=alive, death=death)


def remote(phase: Phase = Phase.PREFILLING, **kw):
    rec = RequestRecord("r", (1, 2, 3), SamplingParams(max_tokens=8))
    attempt = rec.new_attempt(())
    attempt.prefill, attempt.decode = kw.get("prefill", worker("prefill-0")), kw.get(
        "decode", worker("decode-0"))  # fmt: skip
    attempt.prefill_asked, attempt.phase = True, phase
    return rec, attempt


def test_wire_ids_are_per_attempt_and_a_resumed_attempt_skips_prompt_logprobs():
    rec = RequestRecord("cmpl-1", (5, 6), SamplingParams(prompt_logprobs=2))
    first = rec.new_attempt(())
    second = rec.new_attempt((7, 8))
    assert (first.wire_id, second.wire_id) == ("cmpl-1~0", "cmpl-1~1")
    assert rec.params_for(first).prompt_logprobs == 2
    assert rec.params_for(second).prompt_logprobs is None  # went out with token 1 already
    assert rec.attempt is second


def test_phases_follow_the_tokens_and_decide_who_holds():
    _, a = remote()
    p, d = a.prefill, a.decode
    assert a.holds(p) and a.holds(d) and a.stage == "prefill"
    a.observe(1, 0.5)  # prefill's token
    assert a.phase == Phase.TRANSFERRING and a.stage == "transfer" and a.holds(p)
    assert a.finisher(1) is p  # had it ended the request, prefill ended it
    a.observe(2, 0.7)  # decode's tokens
    assert a.phase == Phase.DECODING and a.stage == "decode"
    assert (a.first_token_s, a.decode_s) == (0.5, 0.7)
    assert not a.holds(p) and a.holds(d) and a.finisher(2) is d
    a.phase = Phase.DONE
    assert not a.holds(d)


def test_local_attempt_decodes_from_its_first_token():
    rec = RequestRecord("r", (1,), SamplingParams())
    a = rec.new_attempt((9,), local_on=worker("decode-1"))
    a.decode, a.phase = a.local_on, Phase.PREFILLING
    a.observe(1, 0.3)
    assert a.phase == Phase.DECODING and a.finisher(1) is a.decode


@pytest.mark.parametrize(
    ("phase", "finished_by", "prefill_state", "expected"),
    [
        # the coordinator ended it while prefill computes: KV may be on its way -> quarantine
        (Phase.PREFILLING, None, "alive", [("prefill-0", "abort"), ("decode-0", "abort")]),
        # token 1 ended it on prefill: decode's reservation was never written
        (Phase.TRANSFERRING, "prefill", "alive", [("decode-0", "release")]),
        # decode finished it: nothing left anywhere
        (Phase.DECODING, "decode", "alive", []),
        # decode had taken over when the coordinator ended it (stop string, client gone)
        (Phase.DECODING, None, "alive", [("decode-0", "release")]),
        # the prefill process is gone: nothing can write into decode's blocks any more
        (Phase.TRANSFERRING, None, "dead", [("decode-0", "release")]),
        # hung and killed by us: it might still have been writing -> quarantine
        (Phase.TRANSFERRING, None, "killed", [("decode-0", "abort")]),
    ],
)
def test_end_calls(phase, finished_by, prefill_state, expected):
    p = worker("prefill-0", alive=prefill_state == "alive",
               death={"dead": "worker_died", "killed": "worker_hung"}.get(prefill_state))
    _, a = remote(phase, prefill=p)
    by = {"prefill": a.prefill, "decode": a.decode, None: None}[finished_by]
    assert [(w.name, m) for w, m in a.end_calls(by)] == expected


def test_end_calls_skip_dead_holders_and_unasked_prefill():
    _, a = remote(decode=worker("decode-0", alive=False, death="worker_died"))
    assert [(w.name, m) for w, m in a.end_calls(None)] == [("prefill-0", "abort")]
    _, b = remote()
    b.prefill_asked = False  # reserve went through, the prefill call never did
    assert ("decode-0", "release") in [(w.name, m) for w, m in b.end_calls(None)]


@pytest.mark.parametrize(
    ("fault", "num_attempts", "policy", "decode_alive", "action"),
    [
        (None, 1, "recompute", True, "fail"),  # the request's own error
        ("worker_died", 1, "recompute", True, "retry"),
        ("worker_died", 3, "recompute", True, "fail"),  # attempts used up
        ("step_failed", 2, "retry", True, "retry"),
        ("transfer_failed", 1, "recompute", True, "recompute"),
        ("transfer_timeout", 1, "recompute", False, "retry"),  # decode gone: start afresh
        ("transfer_failed", 1, "retry", True, "retry"),
        ("transfer_failed", 1, "fail", True, "fail"),
        # a prefill worker's send to a decode worker that died: retried whatever on_failure says
        ("worker_died", 1, "fail", False, "retry"),
    ],
)
def test_decide(fault, num_attempts, policy, decode_alive, action):
    _, a = remote(Phase.TRANSFERRING, decode=worker("decode-0", alive=decode_alive))
    decision = decide(Failure("boom", fault), a, num_attempts, 3, policy)
    assert (decision.action, decision.stage) == (action, "transfer")
