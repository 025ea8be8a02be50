"""Speculative decoding is lossless: greedy output with speculation equals greedy without, token
for token (n-gram and draft, with a draft that agrees and one that does not); sampled output
follows the target distribution (chi-square); rolled-back slots leak no blocks."""

from __future__ import annotations

import pytest
import torch

from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig, SpeculativeConfig
from engine.engine_core import EngineCore
from kernels import cpu_ext
from tests.model.test_engine_vs_hf import run_engine

K = 4


def engine_for(model_dir, spec: SpeculativeConfig | None = None, **kw) -> EngineCore:
    cfg = dict(model=str(model_dir), num_blocks=96, block_size=4, max_model_len=256,
               num_threads=1)  # fmt: skip
    return EngineCore(EngineConfig(**{**cfg, **kw}, speculative=spec or SpeculativeConfig()))


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, make_tiny_llama):
    # untied: with tied random embeddings a tiny model just repeats its input token
    return make_tiny_llama(tmp_path_factory.mktemp("target"), seed=11, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory, make_tiny_llama):
    # same vocabulary, different weights and depth: disagrees with the target most of the time
    return make_tiny_llama(tmp_path_factory.mktemp("draft"), seed=99, num_hidden_layers=1,
                           tie_word_embeddings=False)


def repetitive_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(3, 256, (6,), generator=g).tolist()
    return [
        motif * 5,  # n-gram lookup has plenty to copy
        torch.randint(3, 256, (9,), generator=g).tolist(),
        [7] * 3 + motif + torch.randint(3, 256, (20,), generator=g).tolist() + motif[:3],
        torch.randint(3, 256, (33,), generator=g).tolist(),
    ]


@pytest.mark.parametrize("variant", ["ngram", "draft_same", "draft_other"])
def test_greedy_with_speculation_equals_without(target_dir, other_draft_dir, variant):
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = repetitive_prompts()
    plain, _ = run_engine(engine_for(target_dir), prompts, greedy)
    if variant == "ngram":
        spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K, ngram_max=3)
    else:
        draft = target_dir if variant == "draft_same" else other_draft_dir
        spec = SpeculativeConfig(method="draft", num_speculative_tokens=K, draft_model=str(draft),
                                 min_acceptance_rate=0.0)  # fmt: skip
    engine = engine_for(target_dir, spec)
    out, _ = run_engine(engine, prompts, greedy)
    assert out == plain
    m = engine.speculator.metrics
    assert m.draft_tokens > 0
    if variant == "draft_same":  # the target drafting for itself agrees on every token
        assert m.accepted_tokens == m.draft_tokens
    if variant == "draft_other":
        assert m.accepted_tokens < m.draft_tokens / 2
    assert engine.kv.num_used_blocks == 0  # rollback leaks nothing


def test_bfloat16_verification_steps_above_32_rows_equal_the_decode_steps():
    """In bfloat16 a verification step of many sequences (SmolLM2, 10 x (1 + 4) rows) computes
    each row as the decode steps it replaces: every dense call of up to 128 rows runs our
    kernel (csrc/dense_linear.cpp), on a CPU with AMX the same tiles 32 rows at a time, on one
    with AVX512-BF16 the same vdpbf16ps sums 4 rows at a time, where oneDNN's own kernel rounds
    some rows differently in larger calls (on AMX above 32 rows: that left 2-9 of 16 batch-16
    n-gram runs unequal to plain decoding, and fails this test). Greedy tokens and their
    logprobs equal, bit for bit. Without either (or no extension) every call is oneDNN's: not
    covered."""
    ops = cpu_ext.load_ops()
    if ops is None or ops.dense_linear_kernel(576, 576) == "onednn":
        pytest.skip("bfloat16 dense calls take oneDNN on this CPU (no AMX tiles, no AVX512-BF16)")
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    g = torch.Generator().manual_seed(3)
    prompts = [(torch.randint(3, 256, (4,), generator=g).tolist() * 4)[: 9 + i] for i in range(10)]
    rows: list[int] = []

    def make(spec: SpeculativeConfig | None) -> EngineCore:
        cfg = dict(dtype="bfloat16", num_threads=2, max_num_seqs=16, num_blocks=256,
                   block_size=16, max_model_len=512)  # fmt: skip
        engine = engine_for("builtin:smollm2-135m-instruct", spec, **cfg)
        op = engine.model._fused_op
        if op is not None:  # count the rows of each fused step

            def counted(stack, x, *args):
                rows.append(x.shape[0])
                return op(stack, x, *args)

            engine.model._fused_op = counted
        return engine

    plain, plain_deltas = run_engine(make(None), prompts, greedy)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K, ngram_max=3,
                             min_acceptance_rate=0.0)  # fmt: skip
    engine = make(spec)
    rows.clear()
    out, deltas = run_engine(engine, prompts, greedy)
    assert out == plain
    lps = lambda ds: [[lp.logprob for d in r for lp in d.logprobs] for r in ds]  # noqa: E731
    assert lps(deltas) == lps(plain_deltas)
    assert engine.speculator.metrics.accepted_tokens > 0
    assert engine.model._fused_op is None or max(rows) > 32  # verification steps above 32 rows


def test_seeded_sampling_with_ngram_speculation_equals_without(target_dir):
    """n-gram verification accepts a draft iff it equals the sampler's own seeded draw at that
    position: seeded output is token-equal with or without speculation (what lets a migrated
    request resume mid-window and still equal an undisturbed run)."""
    # low temperatures: the tiny model then repeats itself enough for drafts to be accepted
    seeded = [SamplingParams(max_tokens=40, temperature=t, top_p=0.95, seed=s, ignore_eos=True)
              for t, s in ((0.05, 1), (0.1, 2), (1.0, 3), (0.05, 4))]  # fmt: skip
    prompts = repetitive_prompts()

    def run(engine: EngineCore) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, (prompt, params) in enumerate(zip(prompts, seeded, strict=True)):
            engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished():
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.token_ids)
        return out

    plain = run(engine_for(target_dir))
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K, ngram_max=3,
                             min_acceptance_rate=0.0)  # fmt: skip
    engine = engine_for(target_dir, spec)
    assert run(engine) == plain
    assert engine.speculator.metrics.accepted_tokens > 0  # speculation did take tokens
    assert engine.kv.num_used_blocks == 0


def test_rollback_keeps_block_accounting_exact(target_dir, other_draft_dir):
    spec = SpeculativeConfig(method="draft", num_speculative_tokens=K,
                             draft_model=str(other_draft_dir), min_acceptance_rate=0.0)  # fmt: skip
    engine = engine_for(target_dir, spec)
    engine.add_request("a", repetitive_prompts()[3], SamplingParams(max_tokens=30, temperature=0))
    seq = engine.seqs["a"]
    while engine.has_unfinished():
        engine.step()
        if not seq.is_finished and not seq.is_prefilling:
            # exactly the blocks that hold the tokens so far: no lookahead slot kept
            assert len(seq.block_ids) == -(-seq.num_tokens // 4)
            assert engine.kv.num_used_blocks == len(seq.block_ids)
            assert seq.num_computed_tokens == seq.num_tokens - 1
    assert engine.kv.num_used_blocks == 0


def test_low_acceptance_switches_speculation_off(target_dir, other_draft_dir):
    spec = SpeculativeConfig(method="draft", num_speculative_tokens=K,
                             draft_model=str(other_draft_dir), min_acceptance_rate=0.9,
                             warmup_tokens=8)  # fmt: skip
    engine = engine_for(target_dir, spec)
    engine.add_request("a", repetitive_prompts()[1], SamplingParams(max_tokens=40, temperature=0))
    seq = engine.seqs["a"]
    while engine.has_unfinished():
        engine.step()
    assert seq.spec_disabled
    assert engine.speculator.metrics.draft_tokens < 40


def test_opt_out_per_request(target_dir):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K)
    engine = engine_for(target_dir, spec)
    p = SamplingParams(max_tokens=20, temperature=0, use_speculation=False, ignore_eos=True)
    run_engine(engine, repetitive_prompts()[:1], p)
    assert engine.speculator.metrics.draft_tokens == 0
