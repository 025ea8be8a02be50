"""Quality of reduced-precision models against float32: greedy agreement, |delta logprob| and
held-out perplexity, per dtype / weight quantization, in one run.

    python -m bench.quant_quality                    # float32 vs bfloat16, int8, int4, bf16+int4
    python -m bench.quant_quality --configs float32:int4 --new-tokens 32 --prompts 8
    python -m bench.quant_quality --llama-url http://127.0.0.1:8080   # + a llama.cpp server

Workload: the 32 chat prompts of ``bench/chat_prompts.py`` (chat-templated), greedy, N new tokens
each (ignore_eos), one batch per config; perplexity of ``tests/model/data/heldout.txt`` (an
original ~450-word text: prompt logprobs of every token after the first). Against the float32 run:

    identical       prompts whose N generated ids are all equal
    common prefix   leading equal generated ids, averaged over prompts
    |dlogprob|      |logprob - logprob_float32| of the chosen token at every common-prefix
                    position (both runs decoded it from the same context), pooled

``--llama-url``: the same prompts through a llama.cpp server's ``/completion`` (token-id prompts,
greedy, ``n_probs`` for the chosen tokens' logprobs; its perplexity is not measured here).
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.chat_prompts import CHAT_PROMPTS
from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.llm import LLM

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


def greedy(llm: LLM, prompts: list[list[int]], new_tokens: int):
    """(generated ids, chosen-token logprobs) per prompt, all prompts in one batch."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    return [o.token_ids for o in outs], [[lp.logprob for lp in o.logprobs] for o in outs]


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    """exp(-mean logprob) of tokens 1.. of ``token_ids`` given their prefixes."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    (out,) = llm.generate([token_ids], params)
    assert len(out.prompt_logprobs) == len(token_ids) - 1
    return math.exp(-sum(lp.logprob for lp in out.prompt_logprobs) / len(out.prompt_logprobs))


def make_llm(spec: str, threads: int | None) -> LLM:
    """``dtype:quantization``, e.g. ``float32:none`` or ``auto:int4``."""
    dtype, quant = spec.split(":")
    return LLM(EngineConfig(model=MODEL, dtype=dtype, quantization=quant, num_blocks=1024,
                            max_num_seqs=64, num_threads=threads))  # fmt: skip


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
    ap.add_argument("--configs", default="bfloat16:none,float32:int8,float32:int4,bfloat16:int4",
                    help="dtype:quantization pairs compared with float32:none")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-url", default=None)
    args = ap.parse_args()
    ref_llm = make_llm("float32:none", args.threads)
    prompts = [ref_llm.encode_chat(p) for p in CHAT_PROMPTS[: args.prompts]]
    text_ids = ref_llm.tokenizer.encode(HELDOUT.read_text())
    ref = greedy(ref_llm, prompts, args.new_tokens)
    rows = [("float32:none", None, perplexity(ref_llm, text_ids))]
    del ref_llm
    for spec in args.configs.split(","):
        llm = make_llm(spec, args.threads)
        rows.append((spec, compare(*ref, *greedy(llm, prompts, args.new_tokens)),
                     perplexity(llm, text_ids)))  # fmt: skip
        del llm
    if args.llama_url:
        rows.append(("llama.cpp", compare(*ref, *llama_greedy(args.llama_url, prompts,
                                                              args.new_tokens)), None))  # fmt: skip
    print(f"{len(prompts)} chat prompts x {args.new_tokens} greedy tokens vs float32; "
          f"held-out text {len(text_ids)} tokens")  # fmt: skip
    print(f"{'config':>16} {'identical':>9} {'prefix':>7} {'compared':>8} {'mean|dlp|':>9} "
          f"{'max|dlp|':>8} {'ppl':>7}")  # fmt: skip
    for spec, a, ppl in rows:
        p = f"{ppl:7.3f}" if ppl is not None else f"{'-':>7}"
        if a is None:
            print(f"{spec:>16} {'-':>9} {'-':>7} {'-':>8} {'-':>9} {'-':>8} {p}")
            continue
        print(f"{spec:>16} {a.num_identical:>6}/{a.num_prompts:<2} {a.mean_common_prefix:7.2f} "
              f"{a.num_compared:8d} {a.mean_abs_dlogprob:9.4f} {a.max_abs_dlogprob:8.4f} {p}")


if __name__ == "__main__":
    main()
