"""Verification is lossless: emitted tokens follow the target distribution (chi-square over many
seeded trials), for draft-model (q = draft distribution) and n-gram (q = one-hot) proposals;
greedy verification takes the target's argmax; n-gram lookup proposes exactly the right span."""

from __future__ import annotations

import torch

from core.sampling_params import SamplingParams
from engine.sampler import Sampler, filtered_probs
from engine.sequence import Sequence
from engine.spec.ngram import propose_ngram
from engine.spec.verify import verify

V = 8
TRIALS = 6000
CHI2_CRIT_DF7_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with target probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def seq_with_seed(seed: int, **params) -> Sequence:
    return Sequence("r", [1, 2, 3], SamplingParams(max_tokens=8, seed=seed, **params))


def target_and_draft() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, V, generator=g) * 1.5  # rows for positions 0, 1, 2 (k = 2)
    draft = torch.softmax(torch.randn(2, V, generator=g), dim=-1)  # a different distribution
    return target, draft


def test_draft_rejection_sampling_matches_target_distribution():
    target, q = target_and_draft()
    p0 = torch.softmax(target[0], dim=-1)
    g = torch.Generator().manual_seed(123)
    first = torch.zeros(V)
    second_given_accept = torch.zeros(V)
    for trial in range(TRIALS):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        out = verify(target, drafts, seq_with_seed(trial), q)
        first[out[0]] += 1
        if out[0] == drafts[0] and len(out) >= 2:
            second_given_accept[out[1]] += 1
    assert chi2(first, p0) < CHI2_CRIT_DF7_P001
    # the token after an accepted one follows the target's row 1
    assert chi2(second_given_accept, torch.softmax(target[1], dim=-1)) < CHI2_CRIT_DF7_P001


def test_ngram_one_hot_rejection_matches_target_with_top_p():
    target, _ = target_and_draft()
    params = dict(temperature=0.7, top_p=0.9)
    p0 = filtered_probs(target[:1], [SamplingParams(**params)])[0]
    counts = torch.zeros(V)
    draft = int(p0.argmin())  # a poor guess (probability 0 after top-p): always rejected
    draft_good = int(p0.argmax())
    for trial in range(TRIALS):
        d = draft if trial % 2 else draft_good
        out = verify(target, [d, 0], seq_with_seed(trial, **params))
        counts[out[0]] += 1
    assert chi2(counts, p0) < CHI2_CRIT_DF7_P001


def test_a_wrong_residual_would_be_caught():
    """Sanity of the test itself: sampling the first token from q instead fails chi-square."""
    target, q = target_and_draft()
    g = torch.Generator().manual_seed(5)
    counts = torch.bincount(torch.multinomial(q[0], TRIALS, replacement=True, generator=g),
                            minlength=V).float()  # fmt: skip
    assert chi2(counts, torch.softmax(target[0], dim=-1)) > CHI2_CRIT_DF7_P001


def test_greedy_verification_takes_target_argmax():
    target, _ = target_and_draft()
    best = target.argmax(-1).tolist()
    seq = Sequence("r", [1], SamplingParams(max_tokens=8, temperature=0))
    assert verify(target, [best[0], best[1]], seq) == best  # all accepted + bonus
    wrong = (best[0] + 1) % V
    assert verify(target, [wrong, best[1]], seq) == [best[0]]
    assert verify(target, [best[0], (best[1] + 1) % V], seq) == [best[0], best[1]]


def test_seeded_verification_is_reproducible():
    target, q = target_and_draft()
    a = [verify(target, [1, 2], seq_with_seed(s), q) for s in range(50)]
    b = [verify(target, [1, 2], seq_with_seed(s), q) for s in range(50)]
    assert a == b and len({tuple(x) for x in a}) > 1


def test_ngram_proposals_exact():
    assert propose_ngram([1, 2, 3, 4, 1, 2], k=3, n_min=1, n_max=3) == [3, 4, 1]
    # the longest suffix wins over a more recent shorter match
    assert propose_ngram([5, 1, 2, 9, 7, 2, 8, 1, 2], k=2, n_min=1, n_max=2) == [9, 7]
    # most recent occurrence of the suffix
    assert propose_ngram([3, 1, 3, 2, 3], k=1, n_min=1, n_max=1) == [2]
    assert propose_ngram([1, 2, 3], k=2, n_min=1, n_max=3) == []
    assert propose_ngram([4, 4], k=3, n_min=1, n_max=1) == [4]
    assert propose_ngram([7], k=3, n_min=1, n_max=2) == []


def test_seeded_verification_is_reproducible_across_processes():
    """Seeded randomness must not depend on the process (prefill and decode workers, restarts):
    the same seed gives the same tokens under different PYTHONHASHSEEDs."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from tests.unit.test_spec_verify import target_and_draft, seq_with_seed; "
        "from engine.spec.verify import verify; t, q = target_and_draft(); "
        "print([verify(t, [1, 2], seq_with_seed(s), q) for s in range(20)])"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": h, "PYTHONPATH": "."}).stdout
        for h in ("1", "2")
    ]  # fmt: skip
    assert outs[0] == outs[1] and outs[0].startswith("[[")


def test_seeded_ngram_verification_emits_what_plain_sampling_would():
    """n-gram drafts are checked against the sampler's own seeded draw per position: whatever the
    verify window (k, and where it starts: a migrated request resumes mid-window), the tokens are
    those of plain decoding, token for token."""
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(12, V, generator=g) * 0.8  # the target's logits at output positions 0..11
    params = SamplingParams(max_tokens=16, seed=42, temperature=0.9, top_k=6)

    plain = Sequence("r", [1, 2, 3], params)
    for j in range(len(rows)):  # plain decoding: one sampler step per position
        plain.output_token_ids.append(Sampler()(rows[j : j + 1], [plain]).token_ids[0])
    want = plain.output_token_ids

    for start, k in [(0, 3), (2, 4), (5, 2), (1, 6)]:
        for guess in ("right", "wrong", "mixed"):
            seq = Sequence("r", [1, 2, 3], params)
            seq.output_token_ids = list(want[:start])
            drafts = {"right": want[start : start + k],
                      "wrong": [(t + 1) % V for t in want[start : start + k]],
                      "mixed": [*want[start : start + 1], (want[start + 1] + 1) % V,
                                *want[start + 2 : start + k]]}[guess]  # fmt: skip
            out = verify(rows[start : start + k + 1], drafts, seq)
            assert out == want[start : start + len(out)], (start, k, guess)
            if guess == "right":
                assert len(out) == k + 1  # every draft accepted, plus the bonus token
