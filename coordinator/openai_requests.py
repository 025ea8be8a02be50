"""Parse OpenAI-style request bodies into prompt token ids + ``SamplingParams``.

Every rejection is an ``ApiError`` (400 unless said otherwise) whose ``param`` names the offending
request field. Value checks of sampling fields are left to ``SamplingParams`` (the one place
that knows its ranges); its ``ValueError`` starts with the field name, which is mapped back to the
request's own spelling (``max_completion_tokens``, ``top_logprobs``) for ``param``. Fields the
server does not know are refused (``request_fields``), structured output is read by
``structured_request``, chat prompts are built by ``chat_prompt``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from coordinator.api_errors import ApiError, bad_request
from coordinator.chat_prompt import chat_prompt_ids
from coordinator.engine_client import Tokenizer
from coordinator.request_fields import CHAT_FIELDS, COMPLETION_FIELDS, check_fields
from coordinator.structured_request import parse_structured
from core.sampling_params import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the rest of ctx
MAX_CHOICES = 16  # n: choices of one request (each one a sequence on the same decode worker)

# Request fields passed straight through to SamplingParams (vLLM's extensions included).
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "prompt_logprobs",
)


@dataclass(frozen=True)
class ServingLimits:
    model_name: str
    max_model_len: int
    max_prompt_tokens: int


@dataclass(frozen=True)
class GenerationRequest:
    kind: Literal["completion", "chat"]
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool
    want_logprobs: bool
    continuous_usage: bool = False  # usage on every streamed chunk
    echo_text: str | None = None  # text put before the output (echo)
    echo_logprobs: bool = False  # completions echo + logprobs: the prompt's tokens come first
    drop_output: bool = False  # echo with max_tokens 0: the one token generated is not returned
    want_prompt_logprobs: bool = False  # the request asked for prompt_logprobs itself
    structured_param: str | None = None  # the field that asked for structured output
    n: int = 1  # choices

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index``'s sampling: a seeded request's choice i samples with seed + i (so
        the n choices differ, and the same request gives the same n again, as vLLM does); the
        prompt's logprobs are computed by choice 0 only (choices i > 0 prefill only the tail
        past choice 0's cached prompt blocks; the response repeats choice 0's)."""
        if index == 0:
            return self.params
        changes: dict = {"prompt_logprobs": None}
        if self.params.seed is not None:
            changes["seed"] = self.params.seed + index
        return dataclasses.replace(self.params, **changes)


def parse_completion(body: dict, limits: ServingLimits, tokenizer: Tokenizer) -> GenerationRequest:
    check_fields(body, COMPLETION_FIELDS)
    _check_common(body, limits)
    echo = _typed(body, "echo", bool, False)
    add_special = _typed(body, "add_special_tokens", bool, True)
    prompt = body.get("prompt")
    prompt_ids = _completion_prompt(prompt, tokenizer, add_special)
    _check_prompt_length(prompt_ids, limits, "prompt")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    # echo alone (max_tokens 0) scores a prompt: the engine generates one token, not returned
    drop_output = echo and max_tokens == 0 and type(max_tokens) is int
    logprobs = body.get("logprobs")
    overrides: dict = {"max_tokens": 1 if drop_output else max_tokens, "logprobs": logprobs}
    if echo and logprobs is not None and body.get("prompt_logprobs") is None:
        overrides["prompt_logprobs"] = logprobs  # echoed tokens carry logprobs like the rest
    params, structured_param = _sampling_params(body, overrides, {})
    _check_total_length(prompt_ids, params, limits, "max_tokens")
    echo_text = None
    if echo:
        echo_text = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(echo_text, str):
            echo_text = tokenizer.decode(list(prompt_ids))
    stream, include_usage, continuous_usage = _stream_flags(body)
    return GenerationRequest(
        "completion", prompt_ids, params, stream, include_usage, n=_num_choices(body),
        want_logprobs=logprobs is not None, continuous_usage=continuous_usage, echo_text=echo_text,
        echo_logprobs=echo and logprobs is not None, drop_output=drop_output,
        want_prompt_logprobs=body.get("prompt_logprobs") is not None,
        structured_param=structured_param,
    )  # fmt: skip


def parse_chat(body: dict, limits: ServingLimits, tokenizer: Tokenizer) -> GenerationRequest:
    check_fields(body, CHAT_FIELDS)
    _check_common(body, limits)
    if _typed(body, "add_special_tokens", bool, False):
        raise bad_request(
            "add_special_tokens=true is not supported on chat (the template writes them)",
            param="add_special_tokens",
        )
    messages, prompt_ids = chat_prompt_ids(body, tokenizer)
    _check_prompt_length(prompt_ids, limits, "messages")
    # max_completion_tokens is the newer name; it wins when both are given, as in OpenAI's API.
    length_param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(length_param)
    if max_tokens is None:
        max_tokens = limits.max_model_len - len(prompt_ids)
    want_logprobs = _typed(body, "logprobs", bool, False)
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    num_top = (0 if top_logprobs is None else top_logprobs) if want_logprobs else None
    params, structured_param = _sampling_params(
        body,
        {"max_tokens": max_tokens, "logprobs": num_top},
        {"logprobs": "top_logprobs", "max_tokens": length_param},
    )
    _check_total_length(prompt_ids, params, limits, length_param)
    # vLLM's chat echo: a final assistant message (being continued) leads the answer
    echo = _typed(body, "echo", bool, False) and messages[-1]["role"] == "assistant"
    stream, include_usage, continuous_usage = _stream_flags(body)
    return GenerationRequest(
        "chat", prompt_ids, params, stream, include_usage, n=_num_choices(body),
        want_logprobs=want_logprobs,
        continuous_usage=continuous_usage,
        echo_text=messages[-1]["content"] if echo else None,
        want_prompt_logprobs=body.get("prompt_logprobs") is not None,
        structured_param=structured_param,
    )  # fmt: skip


def _check_common(body: dict, limits: ServingLimits) -> None:
    model = body.get("model", limits.model_name)
    if not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    if model != limits.model_name:
        raise model_not_found(model, limits)


def model_not_found(model: str, limits: ServingLimits) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist (served: {limits.model_name})",
        "not_found_error",
        param="model",
        code="model_not_found",
    )


def _num_choices(body: dict) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}", param="n")
    return n


def _stream_flags(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage)."""
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is None:
        return stream, False, False
    if not stream:
        raise bad_request("stream_options requires stream to be true", param="stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise bad_request(f"stream_options: unknown field {unknown[0]}", param="stream_options")
    flags = []
    for name in ("include_usage", "continuous_usage_stats"):
        value = options.get(name, False)
        if not isinstance(value, bool):
            raise bad_request(f"stream_options.{name} must be a boolean", param="stream_options")
        flags.append(value)
    return stream, *flags


def _typed(body: dict, name: str, kind: type, default: object) -> object:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad_request(f"{name} must be a {kind.__name__}, got {value!r}", param=name)
    return value


def _sampling_params(
    body: dict, overrides: dict, renames: dict[str, str]
) -> tuple[SamplingParams, str | None]:
    kwargs = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    if kwargs.get("top_k") == -1:  # vLLM spells "no top-k" as -1; SamplingParams uses 0
        kwargs["top_k"] = 0
    structured, structured_param = parse_structured(body)
    try:
        params = SamplingParams(**{**kwargs, **overrides}, structured=structured)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        param = renames.get(field, field)
        raise bad_request(str(exc).replace(field, param, 1), param=param) from None
    return params, structured_param


def _completion_prompt(
    prompt: object, tokenizer: Tokenizer, add_special_tokens: bool
) -> tuple[int, ...]:
    # A batch of one prompt is accepted (clients often wrap); larger batches are refused.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        return tuple(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        if max(prompt) >= tokenizer.vocab_size:  # the model would index past its embedding
            raise bad_request(f"token id {max(prompt)} is outside the vocabulary "
                              f"[0, {tokenizer.vocab_size})", param="prompt")  # fmt: skip
        return tuple(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad_request("batched prompts are not supported: send one prompt", param="prompt")
    raise bad_request(
        "prompt must be a non-empty string or a non-empty list of token ids", param="prompt"
    )


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_prompt_length(prompt_ids: tuple[int, ...], limits: ServingLimits, param: str) -> None:
    if not prompt_ids:
        raise bad_request("the prompt is empty after tokenization", param=param)
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise bad_request(
            f"the prompt has {len(prompt_ids)} tokens, more than the limit of "
            f"{limits.max_prompt_tokens}",
            param=param,
            code="context_length_exceeded",
        )


def _check_total_length(
    prompt_ids: tuple[int, ...], params: SamplingParams, limits: ServingLimits, param: str
) -> None:
    total = len(prompt_ids) + params.max_tokens
    if total > limits.max_model_len:
        raise bad_request(
            f"{param} is too large: {len(prompt_ids)} prompt tokens + {params.max_tokens} "
            f"exceeds the context length of {limits.max_model_len}",
            param=param,
            code="context_length_exceeded",
        )
