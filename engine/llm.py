"""In-process API: ``LLM(...).generate(prompts, sampling_params)`` over one EngineCore."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from core.outputs import TokenLogprob
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.tokenizer_files import load_tokenizer_files


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated only
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob]  # prompt positions 1.. (position 0 has none)


class LLM:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        if overrides:
            config = EngineConfig(**{**config.__dict__, **overrides})
        self.tokenizer = Tokenizer(load_tokenizer_files(config.model))
        self.engine = EngineCore(config, self.tokenizer)
        self._ids = itertools.count()

    def encode_chat(self, user_message: str) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}])

    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts as one continuous batch; outputs in prompt order. A str prompt is
        tokenized as is (no chat template: use ``encode_chat`` for that)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        order: list[str] = []
        info: dict[str, tuple[str | None, list[int]]] = {}
        for prompt, p in zip(prompts, params, strict=True):
            rid = f"llm-{next(self._ids)}"
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            info[rid] = (prompt if isinstance(prompt, str) else None, ids)
            self.engine.add_request(rid, ids, p)
            order.append(rid)
        tokens: dict[str, list[int]] = {rid: [] for rid in order}
        texts: dict[str, list[str]] = {rid: [] for rid in order}
        lps: dict[str, list[TokenLogprob]] = {rid: [] for rid in order}
        plps: dict[str, list[TokenLogprob]] = {rid: [] for rid in order}
        finish: dict[str, str | None] = {}
        while self.engine.has_unfinished():
            for d in self.engine.step():
                tokens[d.request_id].extend(d.token_ids)
                texts[d.request_id].append(d.text)
                lps[d.request_id].extend(d.logprobs)
                plps[d.request_id].extend(d.prompt_logprobs)
                if d.finished:
                    finish[d.request_id] = d.finish_reason
        return [
            RequestOutput(rid, info[rid][0], info[rid][1], tokens[rid], "".join(texts[rid]),
                          finish.get(rid), lps[rid], plps[rid])  # fmt: skip
            for rid in order
        ]
