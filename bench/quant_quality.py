"""Quality of reduced-precision models against float32: greedy agreement, |delta logprob| and
held-out perplexity, per dtype / weight quantization, in one run.

    python -m bench.quant_quality                    # float32 vs bfloat16, int8, int4, bf16+int4
    python -m bench.quant_quality --configs float32:int4 --new-tokens 32 --prompts 8
    python -m bench.quant_quality --llama-url http://127.0.0.1:8080   # + a llama.cpp server

A config is ``dtype:quantization`` (``+a8``: ``quantize_activations``); with ``@hf`` the model
is first exported as a float32 HF directory (the GGUF dequantized), so int4 / int8 come from our
quantizer on float weights instead of the GGUF's own blocks (``int4`` on the GGUF keeps its Q4_1
blocks: the float32 model's very weights). Batches of at most ``--batch`` (8) sequences, so
decode steps take the quantized kernels.

Workload: the 32 chat prompts of ``bench/chat_prompts.py`` (chat-templated), greedy, N new tokens
each (ignore_eos), one batch per config; perplexity of ``tests/model/data/heldout.txt`` (an
original ~450-word text: prompt logprobs of every token after the first). Against the float32 run:

    identical       prompts whose N generated ids are all equal
    common prefix   leading equal generated ids, averaged over prompts
    |dlogprob|      |logprob - logprob_float32| of the chosen token at every common-prefix
                    position (both runs decoded it from the same context), pooled

``--ppl-chunk 8``: the held-out text is prefilled 8 tokens per step, so that its logprobs come
from the kernels of small steps (the quantized ones, with int8 activations for ``+a8``), as
decoded tokens' do; by default one prefill, which takes the dense path above 8 rows.

``--llama-url``: the same prompts through a llama.cpp server's ``/completion`` (token-id prompts,
greedy, ``n_probs`` for the chosen tokens' logprobs), and its ``/tokenize`` of the held-out text
checked against ours.

``ppl@N`` (``--ppl-ctx N``, 256): perplexity as llama.cpp's ``llama-perplexity -c N`` computes it,
so that its figure for the same GGUF sits in the same column: the text cut into len // N chunks of
N tokens, each evaluated alone, and only the predictions of tokens N/2 + 1 .. N - 1 of each chunk
scored (every token then has at least N/2 of context; no BOS here: the GGUF says add_bos_token
false). ``--llama-perplexity BIN`` runs that tool on the builtin GGUF for the llama.cpp row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.chat_prompts import CHAT_PROMPTS
from bench.spec_decode import save_truncated_draft
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.builtin import builtin_gguf_path, builtin_name
from engine.tokenizer_files import load_tokenizer_files

HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "model" / "data" / "heldout.txt"
MODEL = "builtin:smollm2-135m-instruct"


@dataclass(frozen=True)
class Agreement:
    num_prompts: int
    num_identical: int  # prompts whose generated ids are all equal
    mean_common_prefix: float  # leading equal generated ids, averaged over prompts
    num_compared: int  # chosen-token logprobs compared (sum of common prefixes)
    mean_abs_dlogprob: float
    max_abs_dlogprob: float


def compare(
    ref_tokens: list[list[int]],
    ref_lps: list[list[float]],
    tokens: list[list[int]],
    lps: list[list[float]],
) -> Agreement:
    """A candidate run against a reference run: per prompt, generated ids and the logprob of each
    chosen token."""
    prefixes, dlps = [], []
    for rt, ct, rl, cl in zip(ref_tokens, tokens, ref_lps, lps, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(rt, ct, strict=False)) if a != b),
                 min(len(rt), len(ct)))  # fmt: skip
        prefixes.append(n)
        dlps.extend(abs(a - b) for a, b in zip(rl[:n], cl[:n], strict=True))
    d = torch.tensor(dlps, dtype=torch.float64)
    return Agreement(
        num_prompts=len(ref_tokens),
        num_identical=sum(rt == ct for rt, ct in zip(ref_tokens, tokens, strict=True)),
        mean_common_prefix=sum(prefixes) / len(prefixes),
        num_compared=len(dlps),
        mean_abs_dlogprob=float(d.mean()) if dlps else 0.0,
        max_abs_dlogprob=float(d.max()) if dlps else 0.0,
    )


class Runner:
    """An engine and the builtin model's tokenizer (the model may come from elsewhere)."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer):
        self.engine = EngineCore(config)
        self.tokenizer = tokenizer

    def generate(self, prompts: list[list[int]], params: SamplingParams):
        """Per prompt: (generated ids, chosen-token logprobs, prompt logprobs)."""
        out = {f"q{i}": ([], [], []) for i in range(len(prompts))}
        for rid, p in zip(out, prompts, strict=True):
            self.engine.add_request(rid, p, params)
        while self.engine.has_unfinished():
            for d in self.engine.step():
                tokens, lps, plps = out[d.request_id]
                tokens.extend(d.token_ids)
                lps.extend(lp.logprob for lp in d.logprobs)
                plps.extend(lp.logprob for lp in d.prompt_logprobs)
        return list(out.values())


def greedy(runner: Runner, prompts: list[list[int]], new_tokens: int):
    """(generated ids, chosen-token logprobs) per prompt."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=0)
    outs = runner.generate(prompts, params)
    return [o[0] for o in outs], [o[1] for o in outs]


def perplexity(runner: Runner, token_ids: list[int]) -> float:
    """exp(-mean logprob) of tokens 1.. of ``token_ids`` given their prefixes."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    ((_, _, plps),) = runner.generate([token_ids], params)
    assert len(plps) == len(token_ids) - 1
    return math.exp(-sum(plps) / len(plps))


def chunked_perplexity(runner: Runner, token_ids: list[int], ctx: int) -> float:
    """llama-perplexity's protocol (module docstring, ``ppl@N``): exp of the mean -logprob of
    tokens ctx/2 + 1 .. ctx - 1 of each whole chunk of ctx tokens, chunks evaluated apart."""
    chunks = [token_ids[i : i + ctx] for i in range(0, len(token_ids) - ctx + 1, ctx)]
    assert chunks, f"the text has fewer than {ctx} tokens"
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    first = ctx // 2
    scored = [lp for _, _, plps in runner.generate(chunks, params) for lp in plps[first:]]
    # plps[j]: token j + 1 given tokens 0..j; llama.cpp scores j = first .. ctx - 2
    assert len(scored) == len(chunks) * (ctx - 1 - first)
    return math.exp(-sum(scored) / len(scored))


def llama_perplexity(binary: str, ctx: int, threads: int | None) -> float:
    """llama.cpp's own ``llama-perplexity -c ctx`` on the builtin GGUF and the held-out text."""
    gguf = builtin_gguf_path(builtin_name(MODEL))
    cmd = [binary, "-m", str(gguf), "-f", str(HELDOUT), "-c", str(ctx), "-b", str(ctx),
           "-t", str(threads or os.cpu_count())]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    assert found, out.stdout[-2000:] + out.stderr[-2000:]
    return float(found.group(1))


def llama_tokens(url: str, text: str) -> list[int]:
    req = urllib.request.Request(f"{url}/tokenize", json.dumps({"content": text}).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["tokens"]


def make_runner(spec: str, tokenizer: Tokenizer, threads: int | None, batch: int,
                hf_dir: Path | None = None, chunk: int = 512) -> Runner:  # fmt: skip
    """``dtype:quantization[+a8][@hf]``, e.g. ``float32:none``, ``auto:int4+a8`` or
    ``float32:int4@hf``; ``chunk``: the prefill chunk (and step token budget)."""
    spec, _, where = spec.partition("@")
    dtype, quant = spec.split(":")
    quant, *flags = quant.split("+")
    source = str(hf_dir) if where == "hf" else MODEL
    return Runner(EngineConfig(model=source, dtype=dtype, quantization=quant, num_blocks=512,
                               max_num_seqs=batch, num_threads=threads, chunk_size=chunk,
                               max_num_batched_tokens=max(chunk, batch),
                               quantize_activations="a8" in flags), tokenizer)  # fmt: skip


def llama_greedy(url: str, prompts: list[list[int]], new_tokens: int):
    tokens, lps = [], []
    for p in prompts:
        body = {"prompt": p, "n_predict": new_tokens, "temperature": 0, "top_k": 1,
                "ignore_eos": True, "n_probs": 1, "post_sampling_probs": False,
                "cache_prompt": False}  # fmt: skip
        req = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=300) as resp:
            out = json.loads(resp.read())
        probs = out["completion_probabilities"]
        tokens.append([e["id"] for e in probs])
        lps.append([e["logprob"] for e in probs])
    return tokens, lps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="bfloat16:none,float32:int8,float32:int4,auto:int4,"
                    "float32:int8@hf,float32:int4@hf",
                    help="dtype:quantization[@hf] configs compared with float32:none")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-url", default=None)
    ap.add_argument("--ppl-chunk", type=int, default=512, help="prefill chunk for perplexity")
    ap.add_argument("--ppl-ctx", type=int, default=256, help="llama-perplexity's -c (ppl@N)")
    ap.add_argument("--llama-perplexity", default=None, help="llama.cpp's llama-perplexity binary")
    args = ap.parse_args()
    tokenizer = Tokenizer(load_tokenizer_files(MODEL))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}])
               for p in CHAT_PROMPTS[: args.prompts]]  # fmt: skip
    text_ids = tokenizer.encode(HELDOUT.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = None
        if any(c.endswith("@hf") for c in args.configs.split(",")):
            hf_dir = save_truncated_draft(Path(tmp) / "smollm2-f32", 30)  # all 30 layers
        runner = make_runner("float32:none", tokenizer, args.threads, args.batch)
        ref = greedy(runner, prompts, args.new_tokens)
        ppl_runner = make_runner("float32:none", tokenizer, args.threads, args.batch,
                                 chunk=args.ppl_chunk)  # fmt: skip
        ctx = args.ppl_ctx
        rows = [("float32:none", None, perplexity(ppl_runner, text_ids),
                 chunked_perplexity(ppl_runner, text_ids, ctx))]  # fmt: skip
        for spec in args.configs.split(","):
            runner = make_runner(spec, tokenizer, args.threads, args.batch, hf_dir)
            ppl_runner = make_runner(spec, tokenizer, args.threads, args.batch, hf_dir,
                                     chunk=args.ppl_chunk)  # fmt: skip
            rows.append((spec, compare(*ref, *greedy(runner, prompts, args.new_tokens)),
                         perplexity(ppl_runner, text_ids),
                         chunked_perplexity(ppl_runner, text_ids, ctx)))  # fmt: skip
            print(f"  {spec} done", flush=True)
    same_tokens = "not checked (no --llama-url)"
    if args.llama_url or args.llama_perplexity:
        a = None
        if args.llama_url:
            a = compare(*ref, *llama_greedy(args.llama_url, prompts, args.new_tokens))
            same = llama_tokens(args.llama_url, HELDOUT.read_text()) == text_ids
            same_tokens = "the same" if same else "DIFFERENT"
        lppl = None
        if args.llama_perplexity:
            lppl = llama_perplexity(args.llama_perplexity, args.ppl_ctx, args.threads)
        rows.append(("llama.cpp", a, None, lppl))
    print(f"{len(prompts)} chat prompts x {args.new_tokens} greedy tokens vs float32, batches of "
          f"{args.batch}; held-out text {len(text_ids)} tokens (llama.cpp's: {same_tokens})")
    print(f"{'config':>16} {'identical':>9} {'prefix':>7} {'compared':>8} {'mean|dlp|':>9} "
          f"{'max|dlp|':>8} {'ppl':>7} {'ppl@' + str(args.ppl_ctx):>8}")  # fmt: skip
    for spec, a, ppl, cppl in rows:
        p = f"{ppl:7.3f}" if ppl is not None else f"{'-':>7}"
        p += f" {cppl:8.3f}" if cppl is not None else f" {'-':>8}"
        if a is None:
            print(f"{spec:>16} {'-':>9} {'-':>7} {'-':>8} {'-':>9} {'-':>8} {p}")
            continue
        print(f"{spec:>16} {a.num_identical:>6}/{a.num_prompts:<2} {a.mean_common_prefix:7.2f} "
              f"{a.num_compared:8d} {a.mean_abs_dlogprob:9.4f} {a.max_abs_dlogprob:8.4f} {p}")


if __name__ == "__main__":
    main()
