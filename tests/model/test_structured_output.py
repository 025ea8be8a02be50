"""Structured output in the engine (a tiny random Llama with a byte-level tokenizer: the grammar,
not the model, has to make the output right): outputs follow their grammar with and without
speculation and speculation stays lossless under a grammar; a matcher rebuilt from the tokens so
far continues where the original was and drafts are cut and rolled back; a grammar still
compiling holds back only its own sequence; a spec that does not compile ends as ``rejected``.
(The real model through the whole server: tests/e2e/test_openai_extras.py.)"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from core.outputs import FINISH_REJECTED
from core.sampling_params import SamplingParams
from core.structured_output import StructuredOutput
from engine.engine_config import EngineConfig, SpeculativeConfig
from engine.engine_core import EngineCore
from engine.structured.grammar_cache import GrammarCache
from engine.structured.grammar_compiler import GrammarCompiler
from engine.structured.grammar_state import GrammarState
from engine.structured.token_mask import constrain_drafts
from engine.tokenizer_files import load_tokenizer_files
from tests.model.conftest import save_byte_tokenizer

K = 4
RECORD = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}  # fmt: skip
REGEX = r"[a-c]{2,5}x"
CHOICES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny_llama):
    # untied: with tied random embeddings a tiny model just repeats its input token
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=11, tie_word_embeddings=False)
    return str(save_byte_tokenizer(path))


def engine_for(model_dir: str, speculative: bool = False) -> EngineCore:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K) if speculative else None
    config = EngineConfig(model=model_dir, num_blocks=96, block_size=4, max_model_len=256,
                          num_threads=1, speculative=spec or SpeculativeConfig())  # fmt: skip
    return EngineCore(config)  # token-only, like a worker's: it loads the tokenizer itself


def run(eng: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """(token ids, finish reason, error) per prompt."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", p, sp)
    out = {f"r{i}": [[], None, None] for i in range(len(prompts))}
    while eng.has_unfinished():
        for d in eng.step():
            out[d.request_id][0] += d.token_ids
            if d.finished:
                out[d.request_id][1:] = [d.finish_reason, d.error]
    return [tuple(v) for v in out.values()]


def text(ids: list[int]) -> str:
    return bytes(t for t in ids if t != 2).decode()  # byte tokens; 2 is EOS


def test_outputs_follow_their_grammar_and_speculation_stays_lossless(model_dir):
    # prompts that contain what the grammar wants: n-gram lookup proposes from them
    prompts = [list(s.encode()) for s in
               ('{"ok": true, "n": 42} {"ok": true, "n": 4', "abcx abcx ab", "beta gamma alp")]
    specs = [StructuredOutput.json_schema(RECORD), StructuredOutput("regex", REGEX),
             StructuredOutput.choice(CHOICES)]  # fmt: skip
    greedy = [SamplingParams(max_tokens=24, temperature=0, structured=s) for s in specs]
    sampled = [SamplingParams(max_tokens=24, temperature=1.0, seed=3, structured=s)
               for s in specs]  # fmt: skip
    plain, spec = engine_for(model_dir), engine_for(model_dir, speculative=True)
    want = run(plain, prompts * 2, greedy + sampled)
    got = run(spec, prompts * 2, greedy + sampled)
    assert [g[0] for g in got[:3]] == [w[0] for w in want[:3]]  # greedy: token for token
    assert spec.speculator.metrics.draft_tokens > 0
    for ids, finish, _ in [*want, *got]:
        assert finish == "stop" and ids[-1] == 2  # the grammar ended it with EOS
    for outputs in (want[:3], want[3:], got[3:]):
        (record, *_), (regex, *_), (choice, *_) = outputs
        jsonschema.validate(json.loads(text(record)), RECORD)
        assert re.fullmatch(REGEX, text(regex)) and text(choice) in CHOICES
    for eng in (plain, spec):
        assert eng.kv.num_used_blocks == 0 and not eng.structured.num_parked


def test_a_bad_spec_is_rejected_and_others_are_served(model_dir):
    eng = engine_for(model_dir)
    bad = SamplingParams(max_tokens=3, temperature=0, structured=StructuredOutput("regex", "(a"))
    schema = StructuredOutput.json_schema({"type": "object", "properties": 5})
    worse = SamplingParams(max_tokens=3, temperature=0, structured=schema)
    ok = SamplingParams(max_tokens=3, temperature=0)
    (_, f1, e1), (_, f2, e2), (ids, f3, _) = run(eng, [[5, 6, 7]] * 3, [bad, worse, ok])
    assert (f1, f2, f3) == (FINISH_REJECTED, FINISH_REJECTED, "length")
    assert e1.startswith("invalid regex for structured output: ") and "parenthesis" in e1
    assert "properties must be an object" in e2 and "/project" not in e2
    assert len(ids) == 3 and eng.kv.num_used_blocks == 0


def test_a_compiling_grammar_holds_back_only_its_own_sequence(model_dir):
    eng = engine_for(model_dir)
    gate = threading.Event()
    files = load_tokenizer_files(model_dir)

    def slow_compiler() -> GrammarCompiler:
        gate.wait(60)
        return GrammarCompiler(files, 256, eng.eos_token_ids)

    eng.structured.cache = GrammarCache(slow_compiler)
    structured = SamplingParams(max_tokens=4, temperature=0,
                                structured=StructuredOutput.choice(CHOICES))  # fmt: skip
    eng.add_request("held", [5, 6, 7], structured)
    eng.add_request("free", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0))
    finished = set()
    while "free" not in finished:
        finished |= {d.request_id for d in eng.step() if d.finished}
    assert eng.structured.num_parked == 1 and eng.scheduler.num_running == 0
    gate.set()
    held = []
    while eng.has_unfinished():
        held += [t for d in eng.step() for t in d.token_ids]
    assert text(held) in {c[:4] for c in CHOICES}  # max_tokens 4 of a choice
    assert eng.structured.cache.num_compiles == 1


def test_cache_rebuilt_state_and_draft_rollback(model_dir):
    files = load_tokenizer_files(model_dir)
    built = []
    cache = GrammarCache(lambda: built.append(1) or GrammarCompiler(files, 256, (2,)))
    grammar = cache.get(StructuredOutput.json_schema(RECORD)).result(timeout=60)
    assert cache.get(StructuredOutput.json_schema(json.loads(json.dumps(RECORD)))).done()
    assert cache.num_compiles == 1 and built == [1]  # the same schema again: a hit
    so_far = list(b'{"ok": true, "n": ')
    walked = GrammarState(grammar, [])
    assert all(walked.accept(t) for t in so_far)
    rebuilt = GrammarState(grammar, so_far)  # a decode worker's, or a resumed request's
    masks = torch.zeros(2, 8, dtype=torch.int32)
    walked.fill_mask(masks, 0)
    rebuilt.fill_mask(masks, 1)
    assert torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="does not fit"):
        GrammarState(grammar, list(b"nope"))
    # "12" fits, "x" does not: the drafts are cut there and the matcher is back where it was
    drafts = list(b"12x}")
    rows = torch.randn(len(drafts) + 1, 256)
    kept, raw, _, masked = constrain_drafts(rebuilt, drafts, rows, None)
    assert kept == list(b"12") and torch.equal(raw, rows[:3]) and masked.shape == (3, 256)
    rebuilt.fill_mask(masks, 1)
    assert torch.equal(masks[0], masks[1])
    digits = [t for t in range(256) if torch.isfinite(masked[0, t])]
    assert digits == list(b"0123456789")  # the first row masked at the state before the drafts
    # after "n": 12 only "}" (the last property; a third digit would pass the maximum of 99)
    assert torch.isfinite(masked[2]).nonzero().flatten().tolist() == list(b"}")


def test_a_complete_grammar_ends_the_request_whatever_min_tokens_and_ignore_eos_say(model_dir):
    eng = engine_for(model_dir)
    choice = StructuredOutput.choice(CHOICES)
    params = [SamplingParams(max_tokens=12, min_tokens=10, temperature=0, structured=choice),
              SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=1,
                             structured=choice)]  # fmt: skip
    for ids, finish, _ in run(eng, [[5, 6, 7]] * 2, params):
        assert finish == "stop" and ids[-1] == 2 and text(ids) in CHOICES
