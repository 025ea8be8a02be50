"""FP8 KV cache (``kv_cache_dtype="fp8_e4m3"``): capacity per memory budget, exactly, and accuracy
of SmolLM2-135M (float32 weights) against the full-precision (float32) cache.

Capacity: a block of SmolLM2 (30 layers, 3 KV heads, head_dim 64, block 16) holds
2 * 30 * 16 * 3 * 64 = 184,320 K/V values. Float32: 737,280 B; bfloat16: 368,640 B; FP8: 184,320 B
of data + 2 * 30 * 16 * 3 * 4 = 11,520 B of float32 scales (one per token and KV head) = 195,840 B.
So FP8 holds 368,640 / 195,840 = 1.882x the blocks of a 16-bit cache (2x less the 1/16 scale
overhead: a 64-value row costs 64 + 4 bytes) and 3.765x those of float32.

Accuracy (32 chat prompts, chat-templated, greedy, 64 new tokens each with ignore_eos, all 32 in
one batch per cache dtype). Definitions, per prompt, FP8 run against the float32-cache run:
  - identical: the 64 generated ids are equal;
  - common prefix: the number of leading generated ids that are equal (0..64);
  - |delta logprob|: |logprob_fp8 - logprob_fp32| of the chosen token at each common-prefix
    position (both runs decoded that token from the same context, so the difference is the
    cache's error alone), pooled over all prompts.
Measured (2026-11-23, CPU, torch 2.13, 1 thread): 4/32 prompts identical over all 64 tokens,
mean common prefix 24.75 / 64, mean |delta logprob| 0.032, max 0.281 (over 792 positions). Greedy
agreement over 64 tokens is a harsh measure for a 135M model: its logprob error is small, but one
near-tie flipped anywhere in 64 steps makes a prompt "not identical".
Broken scale path, scratch runs (``kernels.reference.quantize_fp8`` patched to return every scale
times m, so dequantized K and V come out m times too large):
  m = 1.5: 0/32 identical, mean prefix 2.28, mean |dlp| 0.155, max 1.79 (73 positions);
  m = 1.1: 0/32 identical, mean prefix 11.5, mean |dlp| 0.083, max 0.563 (367 positions).
The bounds in the test sit between the FP8 figures and the m = 1.1 ones: each of them fails for
m = 1.1 (and m = 1.5), with margin for run-to-run and platform noise on the good side.
"""

from __future__ import annotations

import pytest
import torch

from bench.chat_prompts import CHAT_PROMPTS
from bench.quant_quality import Agreement
from bench.quant_quality import compare as quality_compare
from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore, build_kv_cache, build_model
from engine.kv_cache import KVCacheSpec
from engine.model_config import ModelConfig
from tests.model.test_engine_vs_hf import run_engine
from tests.prompts import chat_token_ids

NEW_TOKENS = 64


def compare(reference, candidate) -> Agreement:
    """Each argument: ``run_engine``'s (token lists, delta lists), with logprobs requested."""
    (ref_tokens, ref_deltas), (cand_tokens, cand_deltas) = reference, candidate

    def chosen(tokens, deltas):
        lps = [[lp for d in ds for lp in d.logprobs] for ds in deltas]
        assert all(len(lp) == len(t) for lp, t in zip(lps, tokens, strict=True))
        assert all(a.token_id == t for lp, ts in zip(lps, tokens, strict=True)
                   for a, t in zip(lp, ts, strict=True))  # fmt: skip
        return [[a.logprob for a in lp] for lp in lps]

    return quality_compare(ref_tokens, chosen(ref_tokens, ref_deltas),
                           cand_tokens, chosen(cand_tokens, cand_deltas))  # fmt: skip


def smollm2_spec(dtype: torch.dtype, block_size: int = 16) -> KVCacheSpec:
    return KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=block_size,
                       dtype=dtype)  # fmt: skip


def test_block_bytes_exact():
    assert smollm2_spec(torch.float32).bytes_per_block() == 737_280
    assert smollm2_spec(torch.bfloat16).bytes_per_block() == 368_640
    assert smollm2_spec(torch.float16).bytes_per_block() == 368_640
    fp8 = smollm2_spec(torch.float8_e4m3fn)
    assert fp8.data_bytes_per_block() == 184_320
    assert fp8.scale_bytes_per_block() == 11_520
    assert fp8.bytes_per_block() == 195_840
    # 16-bit and float32 caches carry no scales
    assert smollm2_spec(torch.bfloat16).scale_bytes_per_block() == 0


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_capacity_ratio_for_one_budget(block_size):
    budget = 1 << 30
    f32, b16, fp8 = (smollm2_spec(dt, block_size).num_blocks_for_budget(budget)
                     for dt in (torch.float32, torch.bfloat16, torch.float8_e4m3fn))  # fmt: skip
    # per value: 4 B, 2 B, 1 B + 4 B per head_dim (64) values of scale = 17/16 B
    assert b16 == budget // (2 * 30 * block_size * 3 * 64 * 2)
    assert fp8 == budget // (2 * 30 * block_size * 3 * (64 + 4))
    assert fp8 / b16 == pytest.approx(2 * 64 / 68, rel=2e-3)  # 1.882
    assert fp8 / f32 == pytest.approx(4 * 64 / 68, rel=2e-3)  # 3.765


def test_engine_allocates_fp8_blocks_for_budget():
    """The engine's cache is sized from kv_cache_bytes by the same arithmetic, and the FP8 cache
    really has float8 data and float32 scales of the documented shapes."""
    mc = ModelConfig(architecture="llama", vocab_size=256, hidden_size=192, intermediate_size=256,
                     num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                     rope_theta=1e5, max_position_embeddings=2048,
                     tie_word_embeddings=True)  # SmolLM2's cache shape  # fmt: skip
    budget = 64 << 20
    full = build_kv_cache(EngineConfig(kv_cache_bytes=budget), mc, "cpu")
    fp8 = build_kv_cache(EngineConfig(kv_cache_bytes=budget, kv_cache_dtype="fp8_e4m3"), mc, "cpu")
    assert full.num_blocks == budget // 737_280 == 91
    assert fp8.num_blocks == budget // 195_840 == 342
    assert fp8.data.dtype == torch.float8_e4m3fn
    assert tuple(fp8.data.shape) == (342, 30, 2, 16, 3, 64)
    assert fp8.scales is not None and fp8.scales.dtype == torch.float32
    assert tuple(fp8.scales.shape) == (342, 30, 2, 16, 3)
    assert fp8.data.nbytes + fp8.scales.nbytes <= budget
    assert full.scales is None


@pytest.fixture(scope="module")
def chat_prompts(hf_tokenizer):
    return chat_token_ids(hf_tokenizer, CHAT_PROMPTS)


def run_smollm2(model, prompts: list[list[int]], kv_cache_dtype: str):
    # one intra-op thread: with other jobs on 2 cores, spinning OpenMP threads cost 8x here
    config = EngineConfig(num_blocks=512, kv_cache_dtype=kv_cache_dtype, num_threads=1)
    engine = EngineCore(config, model=model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    result = run_engine(engine, prompts, params)
    assert engine.kv.num_used_blocks == 0
    return result


@pytest.mark.slow
def test_fp8_greedy_agreement_and_logprobs(chat_prompts):
    """Bounds between the measured FP8 figures (module docstring: 4/32, 24.75, 0.032, 0.281 over
    792) and those of a 1.1x scale error (0/32, 11.5, 0.083, 0.563 over 367)."""
    assert len(chat_prompts) >= 32
    model = build_model(EngineConfig(), torch.device("cpu"))
    full = run_smollm2(model, chat_prompts, "auto")
    fp8 = run_smollm2(model, chat_prompts, "fp8_e4m3")
    assert all(len(t) == NEW_TOKENS for t in full[0] + fp8[0])
    a = compare(full, fp8)
    print(a)
    assert a.num_identical >= 2
    assert a.mean_common_prefix >= 18.0
    assert a.num_compared >= 550
    assert a.mean_abs_dlogprob <= 0.05
    assert a.max_abs_dlogprob <= 0.45
    # FP8 quantization does change the cache: a bit-identical run would mean it was bypassed
    assert a.max_abs_dlogprob > 0.0
