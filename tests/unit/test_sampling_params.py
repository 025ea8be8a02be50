"""SamplingParams: bad values raise ValueError naming the field; good ones normalise and
round-trip through to_dict / from_dict."""

from __future__ import annotations

import dataclasses
import math

import pytest

from core.sampling_params import SamplingParams

BAD = [
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-3)),
    ("max_tokens", dict(max_tokens=1.5)),
    ("max_tokens", dict(max_tokens="16")),
    ("max_tokens", dict(max_tokens=True)),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)),
    ("temperature", dict(temperature="1")),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=-0.5)),
    ("top_k", dict(top_k=-1)),
    ("top_k", dict(top_k=2.0)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.5)),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=2.0)),
    ("prompt_logprobs", dict(prompt_logprobs=21)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed="7")),
    ("stop", dict(stop=[1])),
    ("stop", dict(stop=5)),
    ("stop_token_ids", dict(stop_token_ids=["a"])),
    ("stop_token_ids", dict(stop_token_ids=[True])),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_parameters_raise_naming_the_field(field, kwargs):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(field), str(info.value)


def test_boundaries_that_are_allowed():
    SamplingParams(max_tokens=1, top_p=1.0, temperature=0.0, top_k=0, min_p=1.0)
    SamplingParams(min_tokens=4, max_tokens=4, logprobs=20, prompt_logprobs=0)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, seed=-5, temperature=3)


def test_normalisation_and_flags():
    p = SamplingParams(stop="END", stop_token_ids=[5, 6], temperature=0)
    assert p.stop == ("END",) and p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert p.greedy and not SamplingParams(temperature=0.7).greedy
    assert not p.has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.1).has_penalties


def test_frozen_and_round_trip():
    p = SamplingParams(max_tokens=9, temperature=0.5, top_k=4, stop=["a", "b"], seed=3,
                       stop_token_ids=[2], logprobs=5, min_tokens=2)  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 10  # type: ignore[misc]
    d = p.to_dict()
    assert d["stop"] == ["a", "b"] and d["stop_token_ids"] == [2]  # msgpack-friendly lists
    assert "extra" not in d
    assert SamplingParams.from_dict(d) == p
    with pytest.raises(ValueError, match="^top_p"):
        SamplingParams.from_dict({**d, "top_p": 0})
