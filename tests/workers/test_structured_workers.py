"""Structured output across the prefill/decode hand-off, worker actors in one process (no Ray;
real NIXL): prefill samples token 1 under the grammar, decode rebuilds the matcher from the
spec and token 1, with n-gram speculation off and on; both equal the colocated worker. A spec
prefill cannot compile ends as ``rejected`` before any KV moves. (Tiny random Llama with a
byte-level tokenizer: the grammar has to make the output right.)"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from worker_harness import collect, hand_off, spec, tokens_of, wait_until

from core.outputs import FINISH_REJECTED
from core.sampling_params import SamplingParams
from core.structured_output import StructuredOutput
from decode.worker import DecodeWorker
from engine.colocated_worker import ColocatedWorker
from prefill.worker import PrefillWorker
from tests.model.conftest import save_byte_tokenizer, save_tiny_llama

RECORD = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}}}
REGEX = r"[a-c]{2,5}x"
CHOICES = ["alpha", "beta", "gamma"]
PROMPTS = [list(s.encode()) for s in ('{"ok": false, "n": 7} {"ok": false, "n":', "abcx abcx ab",
                                      "beta gamma alp", "the quick brown fox jumps")]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=11, tie_word_embeddings=False)
    return str(save_byte_tokenizer(path))


def requests() -> list[tuple[str, list[int], SamplingParams]]:
    specs = [StructuredOutput.json_schema(RECORD), StructuredOutput("regex", REGEX),
             StructuredOutput.choice(CHOICES), StructuredOutput.choice(CHOICES)]
    out = []
    for i, (prompt, s) in enumerate(zip(PROMPTS, specs, strict=True)):
        out.append((f"g{i}", prompt, SamplingParams(max_tokens=24, temperature=0, structured=s)))
        out.append((f"s{i}", prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=i,
                                                    structured=s)))
    # max_tokens 1: ends on the prefill worker, which sampled it under the grammar
    out.append(("first", PROMPTS[3], SamplingParams(max_tokens=1, temperature=0,
                                                    structured=specs[2])))
    return out  # fmt: skip


def test_disaggregated_structured_equals_colocated_with_speculation_off_and_on(model, sink):
    pull, out = sink
    reqs = requests()
    colo = ColocatedWorker(spec("colo", model, out))
    try:
        for rid, prompt, params in reqs:
            colo.add_request(rid, prompt, params.to_dict())
        ref = collect(pull, {rid for rid, *_ in reqs})
    finally:
        colo.shutdown()
    for rid, *_ in reqs:
        if rid == "first":
            assert bytes(tokens_of(ref[rid])) in {c[:1].encode() for c in CHOICES}
            continue
        text = bytes(tokens_of(ref[rid])[:-1]).decode()
        assert ref[rid][-1].finish_reason == "stop" and tokens_of(ref[rid])[-1] == 2  # EOS
        kind = int(rid[1])
        if kind == 0:
            jsonschema.validate(json.loads(text), RECORD)
        elif kind == 1:
            assert re.fullmatch(REGEX, text)
        else:
            assert text in CHOICES
    for decode_spec in ({}, {"speculative": NGRAM}):
        decode = DecodeWorker(spec("decode-0", model, out, **decode_spec))
        prefill = PrefillWorker(spec("prefill-0", model, out))
        try:
            prefill.connect("decode-0", decode.ready()["kv_address"])
            for rid, prompt, params in reqs:
                hand_off(decode, prefill, rid, prompt, params.to_dict())
            got = collect(pull, {rid for rid, *_ in reqs})
            for rid, *_ in reqs:  # greedy and seeded alike (n-gram verification keeps the draws)
                assert tokens_of(got[rid]) == tokens_of(ref[rid]), (decode_spec, rid)
            (first,) = got["first"]
            assert first.finish_reason == "length"
            decode.release(["first"])  # token 1 ended it on prefill (the coordinator's job)
            wait_until(lambda p=prefill: p.stats()["kv_blocks_used"] == 0)
            assert decode.stats()["kv_blocks_used"] == 0
            if decode_spec:
                assert decode.stats()["spec"]["draft_tokens"] > 0
            assert prefill.stats()["loop_error"] is None and decode.stats()["loop_error"] is None
        finally:
            prefill.shutdown()
            decode.shutdown()


def test_a_grammar_prefill_refuses_moves_no_kv(model, sink):
    pull, out = sink
    decode = DecodeWorker(spec("decode-0", model, out))
    prefill = PrefillWorker(spec("prefill-0", model, out))
    try:
        prefill.connect("decode-0", decode.ready()["kv_address"])
        grammar = StructuredOutput("grammar", "root ::= ")
        bad = SamplingParams(max_tokens=5, structured=grammar).to_dict()
        hand_off(decode, prefill, "bad", PROMPTS[3], bad)
        (d,) = collect(pull, {"bad"})["bad"]
        assert d.finish_reason == FINISH_REJECTED and "invalid grammar" in d.error
        assert prefill.stats()["transfer_bytes"] == 0 and not prefill.destinations
        decode.release(["bad"])
        assert decode.stats()["kv_blocks_used"] == 0 and prefill.stats()["kv_blocks_used"] == 0
    finally:
        prefill.shutdown()
        decode.shutdown()
