"""Structured output in the engine (SmolLM2, in process): outputs follow their grammar, with and
without speculation (and speculation stays lossless under a grammar), a matcher rebuilt from
the tokens so far continues where the original was, a grammar still compiling holds back only
its own sequence, and a spec that does not compile ends its request as ``rejected``."""

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
from core.tokenizer import Tokenizer
from engine.engine_config import EngineConfig, SpeculativeConfig
from engine.engine_core import EngineCore, build_model
from engine.structured.grammar_cache import GrammarCache
from engine.structured.grammar_compiler import GrammarCompiler
from engine.structured.grammar_state import GrammarState
from engine.structured.token_mask import constrain_drafts
from engine.tokenizer_files import load_tokenizer_files

pytestmark = pytest.mark.slow  # the builtin model, ~10 s to load on 2 cores

MODEL = "builtin:smollm2-135m-instruct"
K = 4
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
QUESTIONS = [
    "Describe a person as JSON.",
    "Alice is 31 and has a cat called Tom and a dog called Rex. Give her as JSON.",
    "Write a JSON record for a retired sailor.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(load_tokenizer_files(MODEL))


@pytest.fixture(scope="module")
def shared_model():
    config = EngineConfig(model=MODEL, num_threads=2)
    return build_model(config, config.torch_device())


def engine(tokenizer, shared_model, speculative: bool = False) -> EngineCore:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K) if speculative else None
    config = EngineConfig(model=MODEL, num_blocks=256, max_model_len=1024, num_threads=2,
                          speculative=spec or SpeculativeConfig())  # fmt: skip
    return EngineCore(config, tokenizer, model=shared_model)


def run(eng: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """(token ids, text, finish reason, error) per prompt."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", p, sp)
    out = {f"r{i}": [[], [], None, None] for i in range(len(prompts))}
    while eng.has_unfinished():
        for d in eng.step():
            entry = out[d.request_id]
            entry[0] += d.token_ids
            entry[1].append(d.text)
            if d.finished:
                entry[2], entry[3] = d.finish_reason, d.error
    return [(ids, "".join(text), finish, error) for ids, text, finish, error in out.values()]


def test_outputs_follow_their_grammar_with_and_without_speculation(tokenizer, shared_model):
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    choices = ["Paris", "London", "Rome"]
    regex = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    person = StructuredOutput.json_schema(PERSON)
    specs = (person, person, StructuredOutput("regex", regex), StructuredOutput.choice(choices))
    greedy = [SamplingParams(max_tokens=40, temperature=0, structured=s) for s in specs]
    sampled = SamplingParams(max_tokens=40, temperature=0.9, seed=5, structured=person)
    prompts, params = [*chat[:2], chat[0], chat[2], chat[1]], [*greedy, sampled]  # one batch
    plain, spec = engine(tokenizer, shared_model), engine(tokenizer, shared_model, True)
    want = run(plain, prompts, params)
    got = run(spec, prompts, params)
    # greedy speculation is lossless token for token (sampled: in distribution only)
    assert [g[0] for g in got[:4]] == [w[0] for w in want[:4]]
    assert spec.speculator.metrics.draft_tokens > 0  # and really ran
    for _, text, finish, _ in [*want[:2], want[4], got[4]]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert re.fullmatch(regex, want[2][1]) and want[3][1] in choices
    for eng in (plain, spec):
        assert eng.block_pool.num_used_blocks == 0 and not eng.structured.num_parked


def test_a_bad_spec_is_rejected_and_others_are_served(tokenizer, shared_model):
    eng = engine(tokenizer, shared_model)
    prompt = tokenizer.encode("Hello there")
    bad = SamplingParams(max_tokens=3, temperature=0, structured=StructuredOutput("regex", "(a"))
    schema = StructuredOutput.json_schema({"type": "object", "properties": 5})
    worse = SamplingParams(max_tokens=3, temperature=0, structured=schema)
    ok = SamplingParams(max_tokens=3, temperature=0)
    (_, _, f1, e1), (_, _, f2, e2), (ids, _, f3, _) = run(eng, [prompt] * 3, [bad, worse, ok])
    assert (f1, f2, f3) == (FINISH_REJECTED, FINISH_REJECTED, "length")
    assert e1.startswith("invalid regex for structured output: ") and "parenthesis" in e1
    assert "properties must be an object" in e2 and "/project" not in e2
    assert len(ids) == 3


def test_a_compiling_grammar_holds_back_only_its_own_sequence(tokenizer, shared_model):
    eng = engine(tokenizer, shared_model)
    gate = threading.Event()

    def slow_compiler() -> GrammarCompiler:
        gate.wait(60)
        return GrammarCompiler(tokenizer.files, shared_model[0].vocab_size, eng.eos_token_ids)

    eng.structured.cache = GrammarCache(slow_compiler)
    prompt = tokenizer.encode("Count: one, two,")
    eng.add_request("json", prompt, SamplingParams(
        max_tokens=4, temperature=0, structured=StructuredOutput("json_object")))  # fmt: skip
    eng.add_request("free", prompt, SamplingParams(max_tokens=3, temperature=0))
    finished = set()
    while "free" not in finished:
        finished |= {d.request_id for d in eng.step() if d.finished}
    assert eng.structured.num_parked == 1 and eng.scheduler.num_running == 0
    gate.set()
    while eng.has_unfinished():
        for d in eng.step():
            if d.request_id == "json":
                assert d.token_ids[:1] != () or d.finished
    assert eng.structured.cache.num_compiles == 1


def test_cache_hit_state_rebuilt_from_tokens_and_draft_rollback(tokenizer, shared_model):
    vocab = shared_model[0].vocab_size
    compiler_calls = []

    def make() -> GrammarCompiler:
        compiler_calls.append(1)
        return GrammarCompiler(tokenizer.files, vocab, tokenizer.eos_token_ids)

    cache = GrammarCache(make)
    spec = StructuredOutput.json_schema(PERSON)
    grammar = cache.get(spec).result(timeout=60)
    assert cache.get(StructuredOutput.json_schema(json.loads(json.dumps(PERSON)))).done()
    assert cache.num_compiles == 1 and len(compiler_calls) == 1  # same schema: a hit
    tokens = tokenizer.encode('{"name": "Bo", "age": 4', add_special_tokens=False)
    walked = GrammarState(grammar, [])
    for t in tokens:
        assert walked.accept(t)
    rebuilt = GrammarState(grammar, tokens)  # a decode worker's / a resumption's
    masks = [torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32) for _ in range(2)]
    walked.fill_mask(masks[0], 0)
    rebuilt.fill_mask(masks[1], 0)
    assert torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="does not fit"):
        GrammarState(grammar, tokenizer.encode("nope", add_special_tokens=False))
    # drafts: ", " fits after the age, then "xyz" does not: cut there, matcher rolled back
    good = tokenizer.encode(', "', add_special_tokens=False)
    drafts = [*good, *tokenizer.encode("xyz", add_special_tokens=False)]
    rows = torch.randn(len(drafts) + 1, vocab)
    kept, raw, _, masked = constrain_drafts(rebuilt, drafts, rows, None)
    assert kept == good and raw.shape[0] == masked.shape[0] == len(good) + 1
    assert torch.equal(raw, rows[: len(good) + 1])
    rebuilt.fill_mask(masks[1], 0)
    assert torch.equal(masks[0], masks[1])  # back where it started
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert good[0] in allowed and len(allowed) < 50
