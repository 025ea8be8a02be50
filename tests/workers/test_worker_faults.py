"""Workers under failure, in this process over real NIXL: a resumed request continues exactly as
an undisturbed one, a failing step fails only its own requests, transfers that are lost, fail or
come late, and a restarted decode worker that replaces its dead incarnation at the same address."""

from __future__ import annotations

import pytest
from worker_harness import collect, hand_off, spec, tokens_of, wait_until

from core.delta_codec import decode_deltas
from core.outputs import FAULT_STEP_FAILED, FAULT_TRANSFER_FAILED, FAULT_WORKER_DIED
from core.sampling_params import SamplingParams
from decode.worker import DecodeWorker

PROMPT = [5, 17, 3, 42, 8, 23, 11, 2, 31]  # 9 tokens: 3 blocks of 4
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
CUT = 5  # tokens streamed before the worker "failed"


def next_frame(pull, timeout_ms: int = 30_000) -> list:
    assert pull.poll(timeout_ms), "no frame"
    return decode_deltas(pull.recv())


def test_resumed_requests_continue_as_undisturbed_ones(colocated, pair, sink):
    """Prompt + the first CUT tokens prefilled again (colocated, on decode itself, and over the
    prefill -> decode hand-off) give exactly the undisturbed continuation, greedy and seeded."""
    pull = sink[0]
    decode, prefill = pair["decode"], pair["prefill"]
    for params in (GREEDY, SEEDED):
        colocated.add_request("whole", PROMPT, params.to_dict())
        ref = tokens_of(collect(pull, {"whole"})["whole"])
        head = ref[:CUT]
        colocated.add_request("colo", PROMPT, params.to_dict(), head)
        decode.add_request("local", PROMPT, params.to_dict(), head)  # recompute on decode
        res = hand_off(decode, prefill, "remote", PROMPT, params.to_dict(), head)
        assert len(res["block_ids"]) == -(-(len(PROMPT) + CUT) // 4)
        got = collect(pull, {"colo", "local", "remote"}, first=CUT)
        for rid in ("colo", "local", "remote"):
            assert tokens_of(got[rid]) == ref[CUT:], (rid, params.temperature)
            first = got[rid][0]
            assert first.num_output_tokens - len(first.token_ids) == CUT  # placed after them
    wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
    for worker in (colocated, decode, prefill):
        assert worker.stats()["kv_blocks_used"] == 0
        worker.kv.check()


def test_a_failing_step_fails_its_requests_and_the_worker_goes_on(colocated, sink):
    pull = sink[0]
    colocated.arm_fault({"point": "step", "action": "raise", "nth": 2})
    for i in range(3):
        colocated.add_request(f"a{i}", PROMPT, GREEDY.to_dict())
    got = collect(pull, {"a0", "a1", "a2"})
    ends = {rid: ds[-1] for rid, ds in got.items()}
    assert {d.fault for d in ends.values()} == {FAULT_STEP_FAILED}  # step 2 had all three
    assert all("injected fault" in d.error for d in ends.values())
    assert all(d.num_output_tokens == 1 for d in ends.values())  # step 1 (prefill) went fine
    assert colocated.stats()["kv_blocks_used"] == 0 and not colocated.stats()["unhealthy"]
    colocated.add_request("b", PROMPT, GREEDY.to_dict())
    assert collect(pull, {"b"})["b"][-1].finish_reason == "length"  # it goes on
    for _ in range(3):  # three failed steps in a row: it calls itself unhealthy
        colocated.arm_fault({"point": "step", "action": "raise"})
    for i in range(3):
        colocated.add_request(f"c{i}", PROMPT, GREEDY.to_dict())
        assert collect(pull, {f"c{i}"})[f"c{i}"][-1].fault == FAULT_STEP_FAILED
    assert colocated.stats()["unhealthy"]
    colocated.kv.check()
    assert colocated.stats()["kv_blocks_used"] == 0


def test_transfers_lost_failed_or_late(pair, sink):
    pull = sink[0]
    decode, prefill = pair["decode"], pair["prefill"]
    params = GREEDY.to_dict()

    def start(rid: str) -> list[int]:
        return hand_off(decode, prefill, rid, PROMPT, params)["block_ids"]

    prefill.arm_fault({"point": "transfer", "action": "drop"})
    blocks = start("lost")
    (token,) = next_frame(pull)
    assert (token.request_id, len(token.token_ids), token.finish_reason) == ("lost", 1, None)
    wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)  # source freed, nothing sent
    assert decode.leases() == {"lost": ("reserved", len(blocks))}  # still waiting for it
    decode.abort(["lost"])  # what the coordinator does when its deadline passes
    assert decode.leases() == {"lost": ("quarantined", len(blocks))}
    wait_until(lambda: decode.stats()["kv_blocks_used"] == 0, timeout=10)  # 2 s deadline

    prefill.arm_fault({"point": "transfer", "action": "fail"})
    start("failed")
    (first, error) = collect(pull, {"failed"})["failed"]
    assert len(first.token_ids) == 1 and error.fault == FAULT_TRANSFER_FAILED

    prefill.arm_fault({"point": "transfer", "action": "delay", "delay_s": 0.5})
    start("late")
    assert collect(pull, {"late"})["late"][-1].finish_reason == "length"
    decode.release(["failed"])
    wait_until(lambda: decode.stats()["kv_blocks_used"] == 0)
    assert prefill.stats()["kv_blocks_used"] == 0


def test_a_restarted_decode_worker_replaces_its_dead_incarnation(pair, tiny_model, sink):
    """The new incarnation binds the same side-channel address; the prefill worker must write
    with the new NIXL metadata, never the dead one's."""
    pull = sink[0]
    old = pair["decode"]
    prefill = pair["prefill"]
    old_address = old.ready()["kv_address"]
    old.shutdown()
    new = DecodeWorker(spec("decode-0", tiny_model, sink[1], transfer=pair["transfer"]))
    pair["decode"] = new  # the fixture shuts down the new one
    assert new.ready()["kv_address"] == old_address
    prefill.connect("decode-0", new.ready()["kv_address"])
    assert len(prefill.sender.peers) == 1  # the old incarnation is gone
    blocks = hand_off(new, prefill, "r", PROMPT, GREEDY.to_dict())["block_ids"]
    assert collect(pull, {"r"})["r"][-1].finish_reason == "length"
    assert prefill.stats()["transfer_bytes"] > 0
    prefill.forget("decode-0")
    assert prefill.sender.peers == []
    with pytest.raises(ConnectionError, match="not connected"):
        prefill.prefill("s", PROMPT, GREEDY.to_dict(), "decode-0", blocks)


def test_a_prompt_whose_decode_worker_died_meanwhile_frees_its_blocks(pair, sink):
    """The decode worker dies (the coordinator's ``forget``) while a prompt bound for it is
    queued: the prompt is computed, its KV has nowhere to go, so its blocks are freed and the
    request ends with a transfer fault, which the coordinator retries. (Before, the hand-over
    raised on the forgotten peer after leasing the blocks, which then stayed in use for good:
    seen as 3 blocks left on the prefill pool in the kill -9 test of tests/e2e.)"""
    pull = sink[0]
    decode, prefill = pair["decode"], pair["prefill"]
    with prefill.lock:  # the loop waits: the prompt is still queued when the peer goes
        hand_off(decode, prefill, "orphan", PROMPT, GREEDY.to_dict())
        prefill.forget("decode-0")
    end = collect(pull, {"orphan"})["orphan"][-1]
    assert end.fault == FAULT_WORKER_DIED and "'decode-0' is gone" in end.error
    wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
    prefill.kv.check()
    assert prefill.stats()["loop_error"] is None
    decode.release(["orphan"])
    wait_until(lambda: decode.stats()["kv_blocks_used"] == 0)


def test_a_step_that_raises_between_hand_over_and_send_frees_the_blocks(pair, sink):
    """The step raises after the prompt's blocks were handed over (lease SENDING) but before a
    transfer was posted (here the sender refuses destination ids past decode's cache, which
    ``prefill`` does not check): nothing reads the blocks, so failing the step frees them (before,
    the abort freed only ACTIVE leases and these stayed in use for good)."""
    pull = sink[0]
    prefill = pair["prefill"]
    prefill.prefill("bad", PROMPT, GREEDY.to_dict(), "decode-0", [10_000, 10_001, 10_002])
    end = collect(pull, {"bad"})["bad"][-1]
    assert end.fault == FAULT_STEP_FAILED and "outside" in end.error
    wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
    prefill.kv.check()
