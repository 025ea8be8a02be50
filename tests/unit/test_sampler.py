"""Sampler: greedy, seeded reproducibility, top-k / top-p / min-p cuts (statistically), min_tokens,
stop ids and max_tokens, penalty formulas. Plus stop strings through ``LLM.generate``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from core.sampling_params import SamplingParams
from engine.sampler import Sampler
from engine.sequence import Sequence

EOS = 0
V = 32


def make_seq(params: SamplingParams, prompt=(1, 2, 3), outputs=()) -> Sequence:
    seq = Sequence("r", list(prompt), params, eos_token_ids=(EOS,))
    seq.output_token_ids.extend(outputs)
    return seq


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


def sample_run(seq: Sequence, logits: torch.Tensor, steps: int, others: int = 0) -> list[int]:
    """Sample ``steps`` tokens for seq (appending each), batched after ``others`` unseeded rows."""
    sampler = Sampler()
    fillers = [make_seq(SamplingParams(temperature=1.0)) for _ in range(others)]
    for _ in range(steps):
        batch = [*fillers, seq]
        rows = torch.cat([random_logits(others, seed=len(seq.output_token_ids) + 100), logits])
        token = sampler(rows, batch).token_ids[-1]
        seq.output_token_ids.append(token)
    return seq.output_token_ids


def test_temperature_zero_is_argmax():
    logits = random_logits(6)
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(6)]
    result = Sampler()(logits, seqs)
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 6


def test_seeded_sampling_is_reproducible_alone_and_batched():
    logits = random_logits(1, seed=7) / 3  # flat enough that many tokens are likely
    params = SamplingParams(temperature=1.0, seed=1234)
    torch.manual_seed(0)
    alone = sample_run(make_seq(params), logits, 20)
    torch.manual_seed(99)  # the global RNG (used by unseeded rows) must not matter
    again = sample_run(make_seq(params), logits, 20)
    batched = sample_run(make_seq(params), logits, 20, others=3)
    other_seed = sample_run(make_seq(SamplingParams(temperature=1.0, seed=4321)), logits, 20)
    assert alone == again == batched
    assert other_seed != alone
    assert len(set(alone)) > 3  # really sampled, not greedy


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int = 3000) -> torch.Tensor:
    """Token counts over n independent draws (one batch of n rows, fixed global seed)."""
    torch.manual_seed(0)
    seqs = [make_seq(params) for _ in range(n)]
    ids = Sampler()(logits_row.expand(n, -1).contiguous(), seqs).token_ids
    return torch.bincount(torch.tensor(ids), minlength=logits_row.shape[0]).double()


PROBS = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])


def assert_frequencies(counts: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.double() / expected.sum()
    assert counts[expected == 0].sum() == 0, "a token outside the kept set was sampled"
    freq = counts / counts.sum()
    # 3000 draws: a proportion's standard error is below 0.01; allow 4 of them
    assert torch.allclose(freq, expected, atol=0.04), (freq, expected)
    assert (counts[expected > 0] > 0).all()


def test_top_k_keeps_the_k_best():
    counts = draw(PROBS.log(), SamplingParams(top_k=2))
    assert_frequencies(counts, torch.tensor([0.4, 0.3, 0, 0, 0]))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # cumulative mass before each token: 0, .4, .7, .85, .95 -> with p = .8, tokens 0..2 stay
    counts = draw(PROBS.log(), SamplingParams(top_p=0.8))
    assert_frequencies(counts, torch.tensor([0.4, 0.3, 0.15, 0, 0]))
    # p below the best token's mass: the best token alone
    counts = draw(PROBS.log(), SamplingParams(top_p=0.2))
    assert_frequencies(counts, torch.tensor([1.0, 0, 0, 0, 0]))


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # threshold 0.3 * 0.4 = 0.12: tokens of mass 0.10 and 0.05 go
    counts = draw(PROBS.log(), SamplingParams(min_p=0.3))
    assert_frequencies(counts, torch.tensor([0.4, 0.3, 0.15, 0, 0]))


def test_temperature_sharpens_and_combines_with_top_k():
    # temperature 0.5 squares the probabilities (then renormalises); top-k 3 cuts after that
    counts = draw(PROBS.log(), SamplingParams(temperature=0.5, top_k=3))
    assert_frequencies(counts, torch.tensor([0.16, 0.09, 0.0225, 0, 0]))


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.full((1, V), -5.0)
    logits[0, EOS], logits[0, 9], logits[0, 4] = 10.0, 9.0, 1.0  # eos, stop id, a plain token
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9], max_tokens=10)
    sampler = Sampler()
    assert sampler(logits, [make_seq(params, outputs=[])]).token_ids == [4]
    assert sampler(logits, [make_seq(params, outputs=[4])]).token_ids == [4]
    assert sampler(logits, [make_seq(params, outputs=[4, 4])]).token_ids == [EOS]
    # ignore_eos: eos is an ordinary token, only the stop id is banned
    free_eos = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9], ignore_eos=True)
    assert sampler(logits, [make_seq(free_eos)]).token_ids == [EOS]
    # the raw logits (and so the reported logprobs) are untouched
    assert logits[0, EOS] == 10.0


def test_stop_token_ids_eos_and_max_tokens_finish_with_the_right_reason():
    seq = make_seq(SamplingParams(stop_token_ids=[9], min_tokens=2, max_tokens=4))
    for token in (9, 5):  # a stop id while output < min_tokens is an ordinary token
        seq.output_token_ids.append(token)
        assert not seq.check_stop_token(token)
    seq.output_token_ids.append(9)
    assert seq.check_stop_token(9)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", 9)

    seq = make_seq(SamplingParams(max_tokens=4))
    seq.output_token_ids.append(EOS)
    assert seq.check_stop_token(EOS)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", None)

    seq = make_seq(SamplingParams(max_tokens=2, ignore_eos=True))
    seq.output_token_ids.append(EOS)
    assert not seq.check_stop_token(EOS)
    seq.output_token_ids.append(EOS)
    assert seq.check_stop_token(EOS)
    assert seq.finish_reason == "length"


def penalised(params: SamplingParams, prompt, outputs, logits: torch.Tensor) -> torch.Tensor:
    other = make_seq(SamplingParams(temperature=0))  # a row without penalties stays as is
    seqs = [make_seq(params, prompt, outputs), other]
    out = Sampler()._apply_constraints(logits, seqs)  # [2, V]
    assert torch.equal(out[1], logits[1])
    return out[0]


def test_frequency_and_presence_penalties_follow_the_formula():
    logits = random_logits(2)
    params = SamplingParams(frequency_penalty=0.25, presence_penalty=0.5)
    out = penalised(params, prompt=[3, 7], outputs=[3, 3, 5], logits=logits)
    expected = logits[0].clone()
    expected[3] -= 0.25 * 2 + 0.5  # counted in the output twice; prompt tokens do not count
    expected[5] -= 0.25 * 1 + 0.5
    assert torch.allclose(out, expected, atol=1e-6)


def repetition_reference(row: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    out = row.clone()
    for t in seen:
        out[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
    return out


def test_repetition_penalty_on_prompt_and_output_tokens():
    logits = random_logits(2, seed=3)
    logits[0, 3], logits[0, 5] = 2.0, -2.0  # one positive, one negative seen token
    out = penalised(SamplingParams(repetition_penalty=2.0), [3, 7], [5, 5], logits)
    assert torch.allclose(out, repetition_reference(logits[0], {3, 7, 5}, 2.0), atol=1e-6)


def test_repetition_penalty_applies_to_the_first_generated_token():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.5  # prompt token 3 is best until penalised (2 / 2 = 1)
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler()(logits, [make_seq(params, prompt=[3, 7])]).token_ids == [4]


def test_logprobs_are_of_the_raw_distribution():
    logits = random_logits(1)
    seq = make_seq(SamplingParams(temperature=0, logprobs=3))
    result = Sampler()(logits, [seq])
    lp = torch.log_softmax(logits[0], -1)
    (entry,) = result.logprobs
    assert entry.token_id == result.token_ids[0] == int(lp.argmax())
    assert math.isclose(entry.logprob, float(lp.max()), abs_tol=1e-6)
    assert [t for t, _ in entry.top] == lp.topk(3).indices.tolist()


# ---------------------------------------------------------------------- stops through LLM.generate
@pytest.fixture(scope="module")
def llm():
    from engine.llm import LLM

    return LLM(num_blocks=64, max_num_seqs=4, num_threads=1)


@pytest.mark.slow
def test_llm_generate_cuts_text_before_stop_string(llm):
    prompt = llm.encode_chat("Write a long story about the moon.")
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)  # a planned length
    (ref,) = llm.generate([prompt], greedy)
    assert ref.finish_reason == "length" and len(ref.token_ids) == 24
    text = ref.text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    cut = text.index(stop)
    assert cut > 0
    never = "\x07never\x07"
    with_stop = dataclasses.replace(greedy, stop=(never, stop))
    keep_stop = dataclasses.replace(with_stop, include_stop_str_in_output=True)
    stop_id = dataclasses.replace(greedy, stop_token_ids=(ref.token_ids[5],))
    # one batch, mixed parameters
    cut_out, kept, by_id, plain = llm.generate(
        [prompt, prompt, prompt, prompt], [with_stop, keep_stop, stop_id, greedy]
    )
    assert (cut_out.text, cut_out.finish_reason) == (text[:cut], "stop")
    assert cut_out.token_ids == ref.token_ids[: len(cut_out.token_ids)]
    assert len(cut_out.token_ids) < 24
    assert (kept.text, kept.finish_reason) == (text[: cut + len(stop)], "stop")
    first = ref.token_ids.index(ref.token_ids[5])
    assert (by_id.token_ids, by_id.finish_reason) == (ref.token_ids[: first + 1], "stop")
    assert (plain.text, plain.token_ids) == (text, ref.token_ids)


# ---------------------------------------------------------------------- devices
# The seeded path on an explicit device object: CPU always, CUDA where there is one (a generator
# made on the CPU made every seeded request fail there).
DEVICES = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_seeded_sampling_verify_and_draft_run_on_the_logits_device(device):
    from engine.spec.draft import DraftProposer
    from engine.spec.verify import verify

    logits = random_logits(3, seed=11).to(device) / 3
    params = [SamplingParams(temperature=1.0, seed=9), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=0)]  # fmt: skip
    seqs = [make_seq(p) for p in params]
    gen = seqs[0].generator(device=device)
    assert gen.device == logits.device
    first = Sampler()(logits, seqs).token_ids
    again = Sampler()(logits, [make_seq(p) for p in params]).token_ids
    assert first[0] == again[0] and first[2] == again[2] == int(logits[2].argmax())

    rows = random_logits(3, seed=12).to(device)  # k = 2 drafts + bonus row
    seeded = [verify(rows, [1, 2], make_seq(params[0])) for _ in range(2)]
    assert seeded[0] == seeded[1] and 1 <= len(seeded[0]) <= 3

    tokens, q = DraftProposer._pick(logits, [make_seq(p) for p in params], step=0)
    assert q.device == logits.device and torch.allclose(q.sum(-1), torch.ones(3, device=device))
    assert tokens[0] == DraftProposer._pick(logits, [make_seq(params[0])], step=0)[0][0]
    assert q[2, tokens[2]] == 1.0  # greedy rows: one-hot on the argmax


def test_generator_follows_the_device_it_is_asked_for():
    seq = make_seq(SamplingParams(temperature=1.0, seed=3))
    a = seq.generator(device=torch.device("cpu"))
    assert a is seq.generator(device="cpu")  # reused, re-keyed
    assert make_seq(SamplingParams(temperature=1.0)).generator(device="cpu") is None
