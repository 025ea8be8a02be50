"""Our engine against HF transformers: greedy tokens equal, logprobs close.

Tolerance for logprobs (float32 both sides, different kernels and summation order): 2e-4 absolute
on every compared value. Greedy ids must be equal token for token.
"""

from __future__ import annotations

import pytest
import torch

from core.sampling_params import SamplingParams
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore, build_model
from tests.prompts import CHAT_PROMPTS, chat_token_ids

NEW_TOKENS = 48
LOGPROB_ATOL = 2e-4


def run_engine(engine: EngineCore, prompts: list[list[int]], params: SamplingParams):
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    out = {rid: [] for rid in ids}
    deltas = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
            deltas[d.request_id].append(d)
    return [out[r] for r in ids], [deltas[r] for r in ids]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, top_p=None, top_k=None
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def smollm2():
    config = EngineConfig(num_blocks=512)
    return config, build_model(config, torch.device("cpu"))


@pytest.fixture(scope="module")
def chat_prompts(hf_tokenizer):
    return chat_token_ids(hf_tokenizer, CHAT_PROMPTS)


@pytest.fixture(scope="module")
def hf_reference(hf_smollm2, chat_prompts):
    return [hf_greedy(hf_smollm2, p, NEW_TOKENS) for p in chat_prompts]


@pytest.mark.slow
def test_greedy_matches_hf_one_at_a_time_and_batched(smollm2, chat_prompts, hf_reference):
    config, model = smollm2
    engine = EngineCore(config, model=model)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    for prompt, ref in zip(chat_prompts, hf_reference, strict=True):
        (ours,), _ = run_engine(engine, [prompt], greedy)
        assert ours == ref
    batched, _ = run_engine(engine, chat_prompts, greedy)
    assert batched == hf_reference
    assert engine.kv.num_used_blocks == 0


@pytest.mark.slow
def test_chunked_prefill_and_prefix_reuse_match_plain(smollm2, chat_prompts, hf_reference):
    config, model = smollm2
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    chunked = EngineCore(
        EngineConfig(num_blocks=512, chunk_size=7, max_num_batched_tokens=20), model=model
    )
    out, _ = run_engine(chunked, chat_prompts[:4], greedy)
    assert out == hf_reference[:4]
    # The chat template's system prompt is a shared prefix: the second round reuses its blocks.
    cached = EngineCore(EngineConfig(num_blocks=512, block_size=4), model=model)
    run_engine(cached, chat_prompts[:1], greedy)
    cached.add_request("probe", chat_prompts[1], greedy)
    probe = cached.scheduler.waiting[0]
    while cached.has_unfinished():
        cached.step()
    assert probe.num_cached_prompt_tokens >= 8
    assert probe.output_token_ids == hf_reference[1]
    out, _ = run_engine(cached, chat_prompts[2:4], greedy)
    assert out == hf_reference[2:4]


def test_logprobs_close_to_hf(smollm2, chat_prompts, hf_smollm2):
    config, model = smollm2
    engine = EngineCore(config, model=model)
    prompt = chat_prompts[0]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=5, prompt_logprobs=5)
    (tokens,), (deltas,) = run_engine(engine, [prompt], params)
    with torch.no_grad():
        logits = hf_smollm2(torch.tensor([prompt + tokens])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)  # row t predicts token t+1
    prompt_lps = [lp for d in deltas for lp in d.prompt_logprobs]
    assert len(prompt_lps) == len(prompt) - 1
    for pos, lp in enumerate(prompt_lps, start=1):
        assert lp.token_id == prompt[pos]
        assert abs(lp.logprob - ref[pos - 1, prompt[pos]].item()) < LOGPROB_ATOL
        ref_top = ref[pos - 1].topk(5)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), ref_top.values,
                              atol=LOGPROB_ATOL)  # fmt: skip
    out_lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in out_lps] == tokens
    for i, lp in enumerate(out_lps):
        row = ref[len(prompt) - 1 + i]
        assert abs(lp.logprob - row[tokens[i]].item()) < LOGPROB_ATOL
        assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()


@pytest.mark.parametrize("variant", ["tied", "untied_llama3_rope"])
def test_tiny_random_llama_matches_hf(tmp_path, make_tiny_llama, variant):
    import transformers

    overrides = {}
    if variant == "untied_llama3_rope":
        overrides = dict(tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})  # fmt: skip
    path = make_tiny_llama(tmp_path / variant, seed=3, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = EngineCore(EngineConfig(model=str(path), num_blocks=64, block_size=8,
                                     max_model_len=256))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    refs = [hf_greedy(hf, p, 24) for p in prompts]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    out, _ = run_engine(engine, prompts, greedy)
    assert out == refs
    for p, ref in zip(prompts, refs, strict=True):
        (one,), _ = run_engine(engine, [p], greedy)
        assert one == ref
