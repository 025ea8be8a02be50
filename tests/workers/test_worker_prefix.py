"""Prefix reuse across the hand-off, in this process over real NIXL: a decode worker that has a
prompt's prefix cached reserves it instead of receiving it (fewer bytes on the wire, the same
tokens), and every worker publishes the block hashes it caches, as the router computes them."""

from __future__ import annotations

from worker_harness import BLOCK, collect, free_port, hand_off, spec, tokens_of, wait_until

from core.block_hash import prefix_hashes
from core.kv_events import decode_events
from core.sampling_params import SamplingParams
from decode.worker import DecodeWorker
from prefill.worker import PrefillWorker

PROMPT = [5, 17, 3, 42, 8, 23, 11, 2, 31, 9, 14, 27, 6]  # 13 tokens: 3 full blocks of 4 + 1
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True).to_dict()


def stored_hashes(pull, worker: str) -> set[int]:
    held: set[int] = set()
    while pull.poll(100):
        batch = decode_events(pull.recv())
        if batch.worker == worker:
            for kind, h in batch.events:
                (held.add if kind == "stored" else held.discard)(h)
    return held


def test_decode_reuses_its_cached_prefix_and_publishes_it(tiny_model, sink, events):
    pull, out = sink
    port = free_port()
    transfer = {"port_range": [port, port]}
    decode = DecodeWorker(spec("decode-0", tiny_model, out, transfer=transfer, events=events[1]))
    prefill = PrefillWorker(spec("prefill-0", tiny_model, out, transfer=transfer,
                                 events=events[1]))  # fmt: skip
    try:
        prefill.connect("decode-0", decode.ready()["kv_address"])
        first = hand_off(decode, prefill, "a", PROMPT, GREEDY)
        assert first["num_cached"] == 0
        want = tokens_of(collect(pull, {"a"})["a"])
        wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
        sent_whole = prefill.stats()["transfer_bytes"]
        # the decode worker cached the prompt's full blocks (and published them)
        hashes = prefix_hashes(PROMPT, BLOCK)
        assert set(hashes) <= stored_hashes(events[0], "decode-0")
        again = hand_off(decode, prefill, "b", PROMPT, GREEDY)
        assert again["num_cached"] == 3 and again["block_ids"][:3] == first["block_ids"][:3]
        assert tokens_of(collect(pull, {"b"})["b"]) == want  # the same tokens
        wait_until(lambda: prefill.stats()["transfer_bytes"] > sent_whole)
        sent_rest = prefill.stats()["transfer_bytes"] - sent_whole
        assert sent_rest * 4 == sent_whole  # 1 block of 4 crossed the wire, not 4
        assert decode.stats()["prefix_hit_tokens"] == 3 * BLOCK
        assert prefill.stats()["prefix_hit_tokens"] == 3 * BLOCK  # prefill's own cache too
        wait_until(lambda: decode.stats()["kv_blocks_used"] == 0)
        decode.kv.check()
    finally:
        prefill.shutdown()
        decode.shutdown()
