"""Speculative decoding on CPU: decode tokens/s with n-gram and draft-model speculation vs none.

    python -m bench.spec_decode                         # both workloads, batch 1 and 16
    python -m bench.spec_decode --max-new 32 --batch1-prompts 2   # a quick run

Target: the builtin SmolLM2-135M (``--dtype`` / ``--quantization``, float32 by default; intra-op
threads ``--threads``, 1 by default). Draft: there is no smaller model with SmolLM2's
tokenizer on this machine, so the draft is SmolLM2 itself cut to its first ``--draft-layers``
layers (+ final norm and the tied embedding as head), saved as a HF directory in a temp dir:
a self-speculative, early-exit draft, untrained as such.

Workloads (chat-templated, greedy, up to ``--max-new`` tokens, stopping at EOS):
  grounded  summarize / edit / extract / answer from one of four given paragraphs (16 prompts):
            the answer copies spans of its input, which n-gram lookup can find;
  chat      16 open-ended questions: nothing to copy.
Batch 16 runs all 16 prompts of a workload at once; batch 1 runs the first ``--batch1-prompts``
one after another. With a float32 model every configuration must produce the same tokens as no
speculation (asserted); with a 16-bit one the ``same`` column counts the sequences that do.
Decode tokens/s = tokens emitted by decode steps / time in decode steps (prefill steps, the same
in every configuration, are left out; a draft's own prompt catch-up is inside the decode steps).
Acceptance comes from ``engine.speculator.metrics``; sequences whose acceptance stayed below
``min_acceptance_rate`` after ``warmup_tokens`` proposals stop speculating (counted as "off").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.offline_throughput import load_average, machine
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer
from engine.engine_config import EngineConfig, SpeculativeConfig
from engine.engine_core import EngineCore, build_model
from engine.loader import load_model
from engine.tokenizer_files import load_tokenizer_files

MODEL = "builtin:smollm2-135m-instruct"

PARAGRAPHS = [
    "The Great Barrier Reef, off the coast of Queensland in Australia, is the largest coral reef "
    "system in the world. It stretches for more than 2,300 kilometres and is made up of nearly "
    "3,000 individual reefs and 900 islands. The reef was declared a World Heritage Site in 1981. "
    "Rising sea temperatures have caused mass coral bleaching events in 1998, 2002, 2016 and "
    "2017, and scientists warn that the reef could lose most of its coral cover if warming "
    "continues. Tourism linked to the reef brings several billion dollars to the Australian "
    "economy every year.",
    "Marie Curie was born in Warsaw in 1867 and moved to Paris in 1891 to study physics and "
    "mathematics at the Sorbonne. Together with her husband Pierre Curie she discovered two new "
    "elements, polonium and radium. In 1903 she shared the Nobel Prize in Physics with Pierre "
    "Curie and Henri Becquerel for their work on radioactivity, and in 1911 she received the "
    "Nobel Prize in Chemistry on her own. She was the first woman to win a Nobel Prize and is "
    "still the only person to have won it in two different sciences.",
    "Our team meeting on Tuesday covered three topics. First, the website redesign is two weeks "
    "behind schedule because the design files arrived late; Anna will update the timeline by "
    "Friday. Second, the customer survey received 1,240 responses, and 68 percent of customers "
    "said they would recommend our product to a friend. Third, the office will be closed on "
    "the 24th and 25th of December, and everyone should submit holiday requests to Mark before "
    "the end of the month.",
    "To make a simple loaf of bread, mix 500 grams of flour, 10 grams of salt and 7 grams of "
    "dried yeast in a large bowl. Add 300 millilitres of warm water and stir until a dough "
    "forms. Knead the dough for ten minutes until it is smooth, then leave it covered in a warm "
    "place for one hour, until it has doubled in size. Shape it into a loaf, let it rise for "
    "another 30 minutes, and bake it at 220 degrees Celsius for 30 to 35 minutes.",
]

TASKS = [
    "Summarize the following text in two sentences.\n\n{text}",
    "Rewrite the following text in a more formal tone, keeping every fact.\n\n{text}",
    "Extract every number and date from the following text as a bulleted list, each with what "
    "it refers to.\n\n{text}",
    "Read the following text and then list its main points, quoting it where you can.\n\n{text}",
]

CHAT = [
    "What is the best way to learn a new language?",
    "Write a short story about a robot who wants to be a painter.",
    "Why do people enjoy music?",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "What are the pros and cons of working from home?",
    "Explain how a rainbow forms.",
    "What would you do if you could fly for a day?",
    "Describe your ideal weekend.",
    "How can I become more productive in the morning?",
    "Write a poem about the city at night.",
    "What makes a good friend?",
    "Tell me about the history of the bicycle.",
    "How should I prepare for a job interview?",
    "What are some healthy snacks for kids?",
    "Why is exercise good for the brain?",
    "Invent a new holiday and describe how people celebrate it.",
]


def grounded_messages() -> list[str]:
    # round-robin so that the first four prompts cover four paragraphs and four tasks
    return [TASKS[(p + r) % 4].format(text=PARAGRAPHS[p]) for r in range(4) for p in range(4)]


def save_truncated_draft(directory: Path, num_layers: int) -> Path:
    """SmolLM2's first ``num_layers`` layers + final norm + tied head, as a HF directory."""
    cfg, weights = load_model(MODEL, torch.float32)
    def kept(name: str) -> bool:  # "model.layers.<i>.…": only the first num_layers layers
        return not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers

    keep = {name: w.contiguous() for name, w in weights.items() if kept(name)}
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
    }  # fmt: skip
    assert cfg.rope_scaling is None, "SmolLM2 has plain RoPE"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file(keep, str(directory / "model.safetensors"))
    return directory


@dataclass(frozen=True)
class Run:
    tokens: list[list[int]]
    decode_seconds: float
    decode_tokens: int
    metrics: dict | None
    num_spec_off: int  # sequences whose speculation switched itself off

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds


def generate(engine: EngineCore, prompts: list[list[int]], max_new: int, tag: str):
    """Run ``prompts`` as one batch; returns (tokens per prompt, decode s, decode tokens, off)."""
    params = SamplingParams(max_tokens=max_new, temperature=0)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    seqs = [engine.seqs[rid] for rid in ids]
    kinds: list[bool] = []
    schedule = engine.scheduler.schedule

    def recording_schedule(*args, **kwargs):  # to tell decode steps from prefill steps
        batch = schedule(*args, **kwargs)
        kinds.append(bool(batch) and batch.is_prefill)
        return batch

    engine.scheduler.schedule = recording_schedule
    out = {rid: [] for rid in ids}
    decode_s, decode_tok = 0.0, 0
    try:
        while engine.has_unfinished():
            t0 = time.perf_counter()
            deltas = engine.step()
            dt = time.perf_counter() - t0
            n = 0
            for d in deltas:
                out[d.request_id].extend(d.token_ids)
                n += len(d.token_ids)
            if not kinds[-1]:
                decode_s += dt
                decode_tok += n
    finally:
        del engine.scheduler.schedule  # back to the class's method
    assert engine.kv.num_used_blocks == 0
    return [out[r] for r in ids], decode_s, decode_tok, sum(s.spec_disabled for s in seqs)


def run_config(model, tokenizer, spec: SpeculativeConfig, prompts, batch: int, max_new: int,
               base: EngineConfig | None = None):  # fmt: skip
    base = base or EngineConfig(model=MODEL, num_threads=1)
    engine = EngineCore(replace(base, num_blocks=1024, speculative=spec), tokenizer, model=model)
    groups = [prompts] if batch > 1 else [[p] for p in prompts]
    tokens, seconds, count, off = [], 0.0, 0, 0
    for i, group in enumerate(groups):
        t, s, c, o = generate(engine, group, max_new, f"g{i}")
        tokens += t
        seconds, count, off = seconds + s, count + c, off + o
    metrics = engine.speculator.metrics.to_dict() if engine.speculator is not None else None
    return Run(tokens, seconds, count, metrics, off)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--batch1-prompts", type=int, default=4)
    ap.add_argument("--ngram-k", type=int, default=4)
    ap.add_argument("--draft-k", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="model.dtype of the target (auto: per CPU)")
    ap.add_argument("--quantization", default="none", help="none | int8 | int4 (+dense: a dense "
                    "copy for large steps, keep_dense_weights)")  # fmt: skip
    args = ap.parse_args()
    quant = args.quantization.removesuffix("+dense")
    base = EngineConfig(model=MODEL, num_threads=args.threads, dtype=args.dtype,
                        quantization=quant, keep_dense_weights=args.quantization != quant)
    print(f"machine: {machine()}; torch threads {args.threads}; target {base.torch_dtype} "
          f"{args.quantization}; load avg {load_average()}", flush=True)  # fmt: skip
    tokenizer = Tokenizer(load_tokenizer_files(MODEL))
    model = build_model(base, torch.device("cpu"))
    workloads = {
        name: [tokenizer.apply_chat_template([{"role": "user", "content": m}]) for m in msgs]
        for name, msgs in (("grounded", grounded_messages()), ("chat", CHAT))
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        draft_dir = save_truncated_draft(Path(tmp) / "draft", args.draft_layers)
        configs = {
            "none": SpeculativeConfig(),
            f"ngram k={args.ngram_k}": SpeculativeConfig(
                method="ngram", num_speculative_tokens=args.ngram_k),
            f"draft {args.draft_layers}L k={args.draft_k}": SpeculativeConfig(
                method="draft", num_speculative_tokens=args.draft_k, draft_model=str(draft_dir)),
        }  # fmt: skip
        run_config(model, tokenizer, SpeculativeConfig(), workloads["chat"][:1], 1, 8, base)
        for wname, prompts in workloads.items():
            for batch in (1, 16):
                chosen = prompts[: args.batch1_prompts] if batch == 1 else prompts[:batch]
                ref = None  # the run without speculation
                for cname, spec in configs.items():
                    r = run_config(model, tokenizer, spec, chosen, batch, args.max_new, base)
                    if ref is None:
                        ref = r
                    same = sum(a == b for a, b in zip(r.tokens, ref.tokens, strict=True))
                    # float32: equal token for token (tests/model/test_speculative.py). In
                    # bfloat16 a near-tie can flip wherever a verification step (1 + k rows per
                    # sequence) rounds differently from the decode steps it replaces: dense
                    # linears (oneDNN / MKL pick kernels by row count) do; the quantized linears
                    # and the paged decode attention give each row the same bits at any count.
                    assert same == len(ref.tokens) or base.torch_dtype != torch.float32, (
                        f"{cname} changed the greedy output")  # fmt: skip
                    rows.append((wname, batch, cname, r, r.decode_tokens_per_s /
                                 ref.decode_tokens_per_s, same))  # fmt: skip
                    print(f"  {wname} b={batch} {cname}: {r.decode_tokens_per_s:.1f} tok/s "
                          f"(load avg {load_average()})", flush=True)  # fmt: skip
    print(f"\nload avg after: {load_average()}")
    print(f"{'workload':>9} {'batch':>5} {'config':>16} {'dec tok':>8} {'tok/s':>7} {'x none':>7} "
          f"{'accept':>7} {'mean len':>9} {'off':>4} {'same':>5}  accepted/proposed per position")
    out = []
    for wname, batch, cname, r, speedup, same in rows:
        m = r.metrics
        acc = m["accepted_tokens"] / m["draft_tokens"] if m and m["draft_tokens"] else float("nan")
        per_pos = (" ".join(f"{a}/{p}" for a, p in zip(m["accepted_per_position"],
                                                          m["proposed_per_position"], strict=True))
                   if m else "")  # fmt: skip
        mean_len = m["mean_acceptance_length"] if m else float("nan")
        print(f"{wname:>9} {batch:5d} {cname:>16} {r.decode_tokens:8d} "
              f"{r.decode_tokens_per_s:7.1f} {speedup:7.2f} {acc:7.2f} {mean_len:9.2f} "
              f"{r.num_spec_off:4d} {same:2d}/{len(r.tokens):<2d}  {per_pos}")  # fmt: skip
        out.append(dict(workload=wname, batch=batch, config=cname,
                        decode_tokens=r.decode_tokens, decode_seconds=r.decode_seconds,
                        tokens_per_s=r.decode_tokens_per_s, speedup=speedup, metrics=m,
                        num_spec_off=r.num_spec_off, identical=same,
                        num_sequences=len(r.tokens)))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
