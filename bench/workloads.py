"""The requests of a benchmark: what each one asks for, fixed before the run (seeded), so that
every topology of a ``--compare`` run and every request rate sees the same requests.

    fixed   every prompt ``input_len`` random token ids, every output ``output_len`` tokens
    dist    input and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]
            (vLLM's ``random`` dataset)
    mixed   ``long_fraction`` of the prompts ``long_len`` tokens, the rest ``short_len`` (the
            exact count, shuffled), outputs ``output_len``
    chat    multi-turn conversations over /v1/chat/completions: every request carries the same
            ``system_len``-word system prompt, then its conversation so far (``user_len``-word
            user turns, ``output_len``-word assistant turns) and a new user turn. The assistant
            turns are synthetic text fixed in advance (not the model's answers), so each turn
            can be sent at its scheduled arrival; a server's prefix cache sees the shared system
            prompt and each conversation's earlier turns. Lengths are in words (~1 token each
            for Llama-family tokenizers); the server's usage reports exact token counts.

Token-id prompts go to /v1/completions as ``"prompt": [ids]`` (vLLM, llama.cpp and Tandem
accept them); ids are drawn from [1000, 32000), inside any Llama-family vocabulary. Every
request asks for exactly its output length (``ignore_eos``, greedy).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

WORKLOADS = ("fixed", "dist", "mixed", "chat")
TOKEN_ID_RANGE = (1000, 32000)
WORDS = (
    "the river ran past an old mill where the miller counted sacks of grain each morning while "
    "children played near water and birds sang over fields of wheat under a pale sky that "
    "promised rain before evening came across hills towns roads bridges markets ships sailors "
    "maps stories letters songs lamps gardens stones trees clouds winds seasons harvest bread "
    "iron copper silver winter summer spring autumn north south east west river valley mountain "
    "forest meadow harbor village city castle tower engine wheel gear lever number question answer"
).split()


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "fixed"
    input_len: int = 128
    output_len: int = 32
    range_ratio: float = 0.5  # dist
    long_fraction: float = 0.2  # mixed
    long_len: int = 1536
    short_len: int = 100
    system_len: int = 1000  # chat
    user_len: int = 50
    turns: int = 4

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.kind!r}")
        lengths = ("input_len", "output_len", "long_len", "short_len", "system_len", "user_len")
        for name in (*lengths, "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--range-ratio must be in [0, 1)")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError("--long-fraction must be in [0, 1]")

    @property
    def endpoint(self) -> str:
        return "chat/completions" if self.kind == "chat" else "completions"


@dataclass(frozen=True)
class RequestSpec:
    payload: dict = field(hash=False)  # "prompt" or "messages"; the client adds the rest
    input_len: int  # tokens (token-id prompts) or words (chat) sent
    output_len: int


def build_requests(spec: WorkloadSpec, num_requests: int, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    if spec.kind == "chat":
        return _chat(spec, num_requests, rng)
    if spec.kind == "fixed":
        lengths = [(spec.input_len, spec.output_len)] * num_requests
    elif spec.kind == "dist":
        lengths = [
            (_around(rng, spec.input_len, spec.range_ratio),
             _around(rng, spec.output_len, spec.range_ratio))
            for _ in range(num_requests)
        ]  # fmt: skip
    else:
        num_long = round(num_requests * spec.long_fraction)
        inputs = [spec.long_len] * num_long + [spec.short_len] * (num_requests - num_long)
        rng.shuffle(inputs)
        lengths = [(n, spec.output_len) for n in inputs]
    return [RequestSpec({"prompt": _token_ids(rng, n)}, n, out) for n, out in lengths]


def warmup_requests(num_requests: int) -> list[RequestSpec]:
    """Short completions sent before a target's first measured run (not counted)."""
    rng = random.Random(-1)
    return [RequestSpec({"prompt": _token_ids(rng, 32)}, 32, 4) for _ in range(num_requests)]


def _around(rng: random.Random, mean: int, ratio: float) -> int:
    return rng.randint(max(1, math.floor(mean * (1 - ratio))), math.ceil(mean * (1 + ratio)))


def _token_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(n)]


def _text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def _chat(spec: WorkloadSpec, num_requests: int, rng: random.Random) -> list[RequestSpec]:
    system = {"role": "system", "content": _text(rng, spec.system_len)}
    num_conversations = math.ceil(num_requests / spec.turns)
    histories: list[list[dict]] = [[system] for _ in range(num_conversations)]
    requests = []
    for _turn in range(spec.turns):  # turn t of every conversation, then turn t + 1
        for history in histories:
            if len(requests) == num_requests:
                break
            history.append({"role": "user", "content": _text(rng, spec.user_len)})
            words = sum(len(m["content"].split()) for m in history)
            requests.append(RequestSpec({"messages": list(history)}, words, spec.output_len))
            history.append({"role": "assistant", "content": _text(rng, spec.output_len)})
    return requests
