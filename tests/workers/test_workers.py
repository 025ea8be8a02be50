"""Worker actors in one process (no Ray): the disaggregated hand-off over real NIXL / tcp equals
the colocated path, and every way a request can end leaves no block behind."""

from __future__ import annotations

import threading

import pytest
import torch
from worker_harness import BLOCK, collect, hand_off, spec, tokens_of, wait_until

from core.sampling_params import SamplingParams
from decode.worker import DecodeWorker
from engine.colocated_worker import ColocatedWorker
from prefill.worker import PrefillWorker

PROMPTS = [list(range(3, 3 + n)) for n in (1, 4, 7, 13, 30)]


def run_colocated(model: str, out: str, pull, params: SamplingParams) -> list[list[int]]:
    worker = ColocatedWorker(spec("colo", model, out))
    try:
        for i, p in enumerate(PROMPTS):
            worker.add_request(f"c{i}", p, params.to_dict())
        got = collect(pull, {f"c{i}" for i in range(len(PROMPTS))})
        assert worker.stats()["kv_blocks_used"] == 0
    finally:
        worker.shutdown()
    return [tokens_of(got[f"c{i}"]) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("backend", ["nixl", "tcp"])
def test_disaggregated_equals_colocated(tiny_model, sink, backend):
    pull, out = sink
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
    ref = run_colocated(tiny_model, out, pull, params)
    ref_sampled = run_colocated(tiny_model, out, pull, sampled)
    decode = DecodeWorker(spec("decode-0", tiny_model, out, backend))
    prefill = PrefillWorker(spec("prefill-0", tiny_model, out, backend))
    try:
        prefill.connect("decode-0", decode.ready()["kv_address"])
        for tag, p_ in (("g", params), ("s", sampled)):
            for i, prompt in enumerate(PROMPTS):
                res = hand_off(decode, prefill, f"{tag}{i}", prompt, p_.to_dict())
                assert len(res["block_ids"]) == -(-len(prompt) // BLOCK)
        ids = {f"{t}{i}" for t in "gs" for i in range(len(PROMPTS))}
        got = collect(pull, ids)
        for i in range(len(PROMPTS)):
            assert tokens_of(got[f"g{i}"]) == ref[i]
            assert tokens_of(got[f"s{i}"]) == ref_sampled[i]
            assert got[f"g{i}"][-1].num_output_tokens == 10
        wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
        assert decode.stats()["kv_blocks_used"] == 0
        assert prefill.stats()["transfer_bytes"] > 0
        assert prefill.stats()["loop_error"] is None and decode.stats()["loop_error"] is None
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_first_token_finishing_sends_no_kv_and_aborts_free_everything(tiny_model, sink):
    pull, out = sink
    decode = DecodeWorker(spec("decode-0", tiny_model, out))
    prefill = PrefillWorker(spec("prefill-0", tiny_model, out))
    try:
        prefill.connect("decode-0", decode.ready()["kv_address"])
        one = SamplingParams(max_tokens=1, temperature=0).to_dict()
        blocks = hand_off(decode, prefill, "one", PROMPTS[3], one)["block_ids"]
        (d,) = collect(pull, {"one"})["one"]
        assert d.finish_reason == "length" and len(d.token_ids) == 1
        assert prefill.stats()["transfer_bytes"] == 0
        assert decode.stats()["kv_blocks_used"] == len(blocks)
        decode.release(["one"])  # token 1 ended it: the coordinator releases the reservation
        assert decode.stats()["kv_blocks_used"] == 0
        # A long request aborted while decoding frees both sides.
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True).to_dict()
        hand_off(decode, prefill, "long", PROMPTS[4], long)
        wait_until(lambda: decode.stats()["running"] == 1)
        decode.abort(["long"])
        prefill.abort(["long"])
        # Aborted before prefill ran: nothing is sent, nothing is held.
        blocks = decode.reserve("early", PROMPTS[2], long)["block_ids"]
        decode.abort(["early"])
        wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
        # the early reservation is quarantined until the transfer timeout: not reusable yet
        assert decode.stats()["kv_blocks_used"] == len(blocks)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_reserve_refuses_when_full_and_rejects_bad_input(tiny_model, sink):
    pull, out = sink
    decode = DecodeWorker(spec("decode-0", tiny_model, out, num_blocks=4, max_num_seqs=2))
    try:
        p = SamplingParams(max_tokens=4).to_dict()
        assert decode.reserve("a", list(range(3, 15)), p) == {"block_ids": [0, 1, 2],
                                                               "num_cached": 0}  # fmt: skip
        assert decode.reserve("b", list(range(3, 15)), p) is None  # 3 more blocks: none
        assert decode.reserve("c", [5], p) == {"block_ids": [3], "num_cached": 0}
        assert decode.reserve("d", [5], p) is None  # max_num_seqs
        with pytest.raises(ValueError, match="duplicate"):
            decode.reserve("a", [5], p)
        with pytest.raises(ValueError, match="max_model_len"):
            decode.reserve("e", [5] * 300, p)
    finally:
        decode.shutdown()


def test_fp8_decode_pool_gets_fp8_on_the_wire_and_matches_colocated_fp8(tiny_model, sink):
    """Prefill keeps full precision, decode keeps FP8: the sender quantizes before the WRITE,
    with the same quantizer the colocated FP8 cache uses, so the tokens are identical."""
    pull, out = sink
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    colo = ColocatedWorker(spec("colo", tiny_model, out, kv_cache_dtype="fp8_e4m3"))
    try:
        for i, p in enumerate(PROMPTS):
            colo.add_request(f"c{i}", p, params.to_dict())
        ref = collect(pull, {f"c{i}" for i in range(len(PROMPTS))})
    finally:
        colo.shutdown()
    decode = DecodeWorker(spec("decode-0", tiny_model, out, kv_cache_dtype="fp8_e4m3"))
    prefill = PrefillWorker(spec("prefill-0", tiny_model, out))
    try:
        prefill.connect("decode-0", decode.ready()["kv_address"])
        for i, prompt in enumerate(PROMPTS):
            hand_off(decode, prefill, f"r{i}", prompt, params.to_dict())
        got = collect(pull, {f"r{i}" for i in range(len(PROMPTS))})
        for i in range(len(PROMPTS)):
            assert tokens_of(got[f"r{i}"]) == tokens_of(ref[f"c{i}"])
        wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
        # FP8 data + float32 scales per token and head: well under half of the fp32 bytes
        fp32_bytes = (
            sum(-(-len(p) // BLOCK) for p in PROMPTS)
            * prefill.engine.kv_cache.spec.bytes_per_block()
        )
        assert prefill.stats()["transfer_bytes"] < fp32_bytes / 2
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_the_loop_thread_builds_and_runs_the_engine_and_a_failed_build_raises(tiny_model, sink):
    """One thread per worker runs torch (engine/worker_base.py: one OpenMP team per process)."""
    pull, out = sink
    threads_here = torch.get_num_threads()
    worker = ColocatedWorker(spec("colo", tiny_model, out, num_threads=2))
    try:
        seen: set[tuple[int, int]] = set()  # (thread, its torch threads) of every forward
        worker.engine.model.register_forward_pre_hook(
            lambda *_: seen.add((threading.get_ident(), torch.get_num_threads()))
        )
        worker.add_request("r", PROMPTS[2], SamplingParams(max_tokens=4, temperature=0).to_dict())
        collect(pull, {"r"})
        assert seen == {(worker._thread.ident, 2)}
        assert worker._thread.ident != threading.get_ident()
        assert torch.get_num_threads() == threads_here  # set on the loop thread, not here
    finally:
        worker.shutdown()
    before = threading.active_count()
    with pytest.raises(ValueError, match="no-such-model"):
        ColocatedWorker(spec("bad", "/nonexistent/no-such-model", out))
    assert threading.active_count() == before  # the failed worker's loop thread ended
