"""KV sent in layer groups while prefill computes, in this process over real NIXL: every byte
lands exactly as a whole-request send puts it, the tokens are the same, and a request that
prefill's token ends is discarded on decode at once."""

from __future__ import annotations

from worker_harness import collect, free_port, hand_off, spec, tokens_of, wait_until

from core.sampling_params import SamplingParams
from decode.worker import DecodeWorker
from prefill.worker import PrefillWorker

PROMPT = list(range(7, 7 + 29))  # 29 tokens: 7 full blocks of 4 and one partial
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True).to_dict()


def run_pair(model: str, sink, layer_groups: int, max_tokens: int = 6):
    """(tokens, the decode cache's copy of the prompt's full blocks, bytes sent, leases)."""
    pull, out = sink
    transfer = {"port_range": [(port := free_port()), port], "layer_groups": layer_groups}
    decode = DecodeWorker(spec("decode-0", model, out, transfer=transfer))
    prefill = PrefillWorker(spec("prefill-0", model, out, transfer=transfer))
    try:
        assert len(prefill.layer_groups) == layer_groups  # the tiny Llama has 2 layers
        prefill.connect("decode-0", decode.ready()["kv_address"])
        params = {**GREEDY, "max_tokens": max_tokens}
        res = hand_off(decode, prefill, "r", PROMPT, params)
        tokens = tokens_of(collect(pull, {"r"})["r"])
        wait_until(lambda: prefill.stats()["kv_blocks_used"] == 0)
        wait_until(lambda: decode.stats()["kv_blocks_used"] == 0)  # no coordinator needed
        full = res["block_ids"][: len(PROMPT) // 4]
        landed = decode.engine.kv_cache.data[full].clone()  # [blocks, layers, 2, block, h, d]
        decode.kv.check()
        prefill.kv.check()
        assert prefill.stats()["transfers"] == layer_groups  # one per group, discard included
        return tokens, landed, prefill.stats()["transfer_bytes"]
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_layer_groups_land_every_byte_of_a_whole_request_send(tiny_model, sink):
    tokens, landed, sent = run_pair(tiny_model, sink, 1)
    grouped_tokens, grouped, grouped_sent = run_pair(tiny_model, sink, 2)
    assert grouped_tokens == tokens
    assert grouped_sent == sent  # the same bytes, in two transfers
    assert grouped.shape == landed.shape and bool((grouped == landed).all())


def test_a_request_ended_by_prefills_token_is_discarded_on_decode(tiny_model, sink):
    """max_tokens 1: token 1 ends it on prefill after the early groups went out; the last group
    says so, and decode frees the reservation without being told (no coordinator here)."""
    tokens, _, sent = run_pair(tiny_model, sink, 2, max_tokens=1)
    assert len(tokens) == 1 and sent > 0
