"""Structured output: decode throughput with a JSON schema against without, and grammar compile
time (cold and cached), in one run.

    python -m bench.structured_output                      # 1 and 16 streams, 3 rounds
    python -m bench.structured_output --sizes 1 --rounds 1 --max-new 32   # a quick run

In-process ``EngineCore`` (the code every worker steps), builtin SmolLM2-135M, float32, greedy,
prefix caching off (every run prefills afresh). The same chat prompts run with and without the
schema, alternating (free, schema, free, schema ...) so that drift in machine load hits both.
The schema is an array of at least 64 small records ({"id": integer, "name": string}), so no
request ends before ``--max-new`` (free text runs with ignore_eos): every run generates exactly
n x max-new tokens. A second schema bounds the strings (``maxLength: 12``), which xgrammar
0.2.8 masks much more slowly inside the string.
tokens/s = generated tokens / wall time (prefill included). The grammar's own share is timed
inside the run: ``mask_logits`` (fill the matchers' bitmasks + mask the logits, per step) and
the matchers' accept calls. Compile: xgrammar over the model's vocabulary, on the worker's
compile thread's code path (``GrammarCompiler``, ``GrammarCache``); cold = a schema never seen,
cached = the same spec asked again.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import engine.sampler
from bench.offline_throughput import load_average, machine
from core.sampling_params import SamplingParams
from core.structured_output import StructuredOutput
from core.tokenizer import Tokenizer
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.structured import grammar_state
from engine.structured.grammar_cache import GrammarCache
from engine.structured.grammar_compiler import GrammarCompiler
from engine.tokenizer_files import load_tokenizer_files

MODEL = "builtin:smollm2-135m-instruct"
RECORDS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
        "required": ["id", "name"],
        "additionalProperties": False,
    },
    "minItems": 64,
}
# the same with bounded strings: xgrammar 0.2.8 masks inside a maxLength string far more slowly
BOUNDED = {**RECORDS, "items": {**RECORDS["items"], "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12}}}}  # fmt: skip
QUESTIONS = [
    "List the employees of a small company as JSON records.",
    "Give me a JSON list of cities with an id and a name.",
    "Write a JSON array of books, each with an id and a title.",
    "Produce JSON records for the planets of the solar system.",
]
# schemas for the compile timings: small, medium, a wide object, and the other kinds
WIDE = {"type": "object", "required": [f"f{i}" for i in range(40)],
        "properties": {f"f{i}": {"type": ["string", "integer", "number", "boolean"]}
                       for i in range(40)}}  # fmt: skip
COMPILE_SPECS = {
    "json_schema records": StructuredOutput.json_schema(RECORDS),
    "records, maxLength 12": StructuredOutput.json_schema(BOUNDED),
    "json_schema 40 fields": StructuredOutput.json_schema(WIDE),
    "json_object": StructuredOutput("json_object"),
    "regex": StructuredOutput("regex", r"[A-Z][a-z]{2,8} [0-9]{1,3}(, [A-Z][a-z]+)*"),
    "choice (3)": StructuredOutput.choice(["Paris", "London", "Rome"]),
    "grammar (EBNF)": StructuredOutput("grammar", 'root ::= "(" expr ")"\n'
                                       'expr ::= [0-9]+ | expr "+" expr'),
}


class Timer:
    """Wraps a function and sums its wall time."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def run(eng: EngineCore, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}-{time.monotonic_ns()}", p, params)
    start, num_tokens = time.perf_counter(), 0
    while eng.has_unfinished():
        num_tokens += sum(len(d.token_ids) for d in eng.step())
    return time.perf_counter() - start, num_tokens


def compile_times(tokenizer: Tokenizer, vocab: int, eos: tuple[int, ...]) -> None:
    start = time.perf_counter()
    files = load_tokenizer_files(MODEL)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler = GrammarCompiler(files, vocab, eos)
    build_s = time.perf_counter() - start
    print(f"\nfirst grammar on a worker: load tokenizer files {load_s:.2f} s (GGUF via "
          f"transformers), build the xgrammar compiler {build_s:.2f} s")  # fmt: skip
    print(f"{'spec':<22} {'cold ms':>9} {'cached us':>10} {'cold/cached':>12}")
    cache = GrammarCache(lambda: compiler)
    for name, spec in COMPILE_SPECS.items():
        start = time.perf_counter()
        cache.get(spec).result()
        cold = time.perf_counter() - start
        hits = []
        for _ in range(100):
            start = time.perf_counter()
            future = cache.get(StructuredOutput.from_dict(spec.to_dict()))  # an equal new spec
            assert future.done()
            future.result()
            hits.append(time.perf_counter() - start)
        hit = statistics.median(hits)
        print(f"{name:<22} {cold * 1e3:9.2f} {hit * 1e6:10.1f} {cold / hit:12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,16")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {machine()}; torch threads {args.threads}; load avg {load_average()}")
    tokenizer = Tokenizer(load_tokenizer_files(MODEL))
    config = EngineConfig(model=MODEL, num_blocks=1024, max_model_len=1024,
                          num_threads=args.threads, enable_prefix_caching=False)  # fmt: skip
    eng = EngineCore(config, tokenizer)
    mask = Timer(engine.sampler.mask_logits)
    engine.sampler.mask_logits = mask
    accept = Timer(grammar_state.GrammarState.accept)
    grammar_state.GrammarState.accept = lambda state, token: accept(state, token)
    free = SamplingParams(max_tokens=args.max_new, temperature=0, ignore_eos=True)
    variants = {"free": free}
    for name, schema in (("schema", RECORDS), ("bounded", BOUNDED)):
        variants[name] = SamplingParams(max_tokens=args.max_new, temperature=0, ignore_eos=True,
                                        structured=StructuredOutput.json_schema(schema))
    for name in ("schema", "bounded"):  # compiler built, grammars compiled, kernels loaded
        run(eng, [tokenizer.encode("warm up")], variants[name])
    print(f"\n{args.max_new} new tokens per stream, greedy; {args.rounds} rounds, alternating; "
          "mask = ms per decode step filling the bitmasks + masking the logits; accept = us "
          "per token advancing a matcher")  # fmt: skip
    print(f"{'streams':>7} {'variant':>8} {'tok/s':>7} {'/ free':>7} {'mask ms':>8} "
          f"{'accept us':>10}   runs tok/s")  # fmt: skip
    for n in [int(x) for x in args.sizes.split(",")]:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}])
                   for q in (QUESTIONS * n)[:n]]  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cost = {name: [0.0, 0.0, 0] for name in variants}  # mask s, accept s, accepts
        for _ in range(args.rounds):
            for name, params in variants.items():
                mask.seconds = accept.seconds = accept.calls = 0
                seconds, tokens = run(eng, prompts, params)
                assert tokens == n * args.max_new, (name, tokens)
                rates[name].append(tokens / seconds)
                c = cost[name]
                c[0], c[1], c[2] = c[0] + mask.seconds, c[1] + accept.seconds, c[2] + accept.calls
        base = statistics.median(rates["free"])
        steps = args.rounds * args.max_new  # decode steps per variant (+1 prefill per run)
        for name, runs in rates.items():
            rate = statistics.median(runs)
            mask_ms, accept_s, num_accepts = cost[name][0] / steps * 1e3, *cost[name][1:]
            print(f"{n:7d} {name:>8} {rate:7.1f} {rate / base:7.3f} {mask_ms:8.3f} "
                  f"{accept_s / max(num_accepts, 1) * 1e6:10.1f}   "
                  f"{', '.join(f'{r:.1f}' for r in runs)}")  # fmt: skip
    compile_times(tokenizer, eng.model_config.vocab_size, eng.eos_token_ids)
    print(f"\nload avg at the end {load_average()}; torch {torch.__version__}")
    eng.add_request("show", prompts[0], SamplingParams(max_tokens=40, temperature=0,
                    structured=variants["schema"].structured))  # fmt: skip
    text = []
    while eng.has_unfinished():
        text += [d.text for d in eng.step()]
    print("sample (40 tokens, cut):", "".join(text))


if __name__ == "__main__":
    main()
