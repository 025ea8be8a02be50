"""Parse OpenAI-style request bodies into prompt token ids + ``SamplingParams``.

Every rejection is an ``ApiError`` (400 unless said otherwise) whose ``param`` names the offending
request field. Value checks of sampling fields are left to ``SamplingParams`` (the one place
that knows its ranges); its ``ValueError`` starts with the field name, which is mapped back to the
request's own spelling (``max_completion_tokens``, ``top_logprobs``) for ``param``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coordinator.api_errors import ApiError, bad_request
from coordinator.engine_client import Tokenizer
from core.sampling_params import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default; chat defaults to the rest of ctx
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

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


def parse_completion(body: dict, limits: ServingLimits, tokenizer: Tokenizer) -> GenerationRequest:
    _check_common(body, limits)
    if body.get("echo") not in (None, False):
        raise bad_request("echo is not supported", param="echo")
    if body.get("suffix") is not None:
        raise bad_request("suffix is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise bad_request("only best_of=1 is supported", param="best_of")
    prompt_ids = _completion_prompt(body.get("prompt"), tokenizer)
    _check_prompt_length(prompt_ids, limits, "prompt")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs = body.get("logprobs")
    params = _sampling_params(body, max_tokens, logprobs, {"logprobs": "logprobs"})
    _check_total_length(prompt_ids, params, limits, "max_tokens")
    return GenerationRequest(
        "completion", prompt_ids, params, *_stream_flags(body), want_logprobs=logprobs is not None
    )


def parse_chat(body: dict, limits: ServingLimits, tokenizer: Tokenizer) -> GenerationRequest:
    _check_common(body, limits)
    messages = _chat_messages(body.get("messages"))
    try:
        prompt_ids = tuple(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except Exception as exc:  # templates reject conversations by raising anything
        # (jinja's raise_exception -> TemplateError); a template refusing the input is a 400.
        raise bad_request(f"cannot apply the chat template: {exc}", param="messages") from None
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
    params = _sampling_params(
        body, max_tokens, num_top, {"logprobs": "top_logprobs", "max_tokens": length_param}
    )
    _check_total_length(prompt_ids, params, limits, length_param)
    return GenerationRequest(
        "chat", prompt_ids, params, *_stream_flags(body), want_logprobs=want_logprobs
    )


def _check_common(body: dict, limits: ServingLimits) -> None:
    model = body.get("model", limits.model_name)
    if not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    if model != limits.model_name:
        raise ApiError(
            404,
            f"The model `{model}` does not exist (served: {limits.model_name})",
            "not_found_error",
            param="model",
            code="model_not_found",
        )
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad_request(f"only n=1 is supported, got {n!r}", param="n")
    # Refused rather than ignored: a client that asked for these would misread a plain answer.
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise bad_request(f"{name} is not supported", param=name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise bad_request("stream_options requires stream to be true", param="stream_options")
    include_usage = options is not None and options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage must be a boolean", param="stream_options")
    return stream, include_usage


def _typed(body: dict, name: str, kind: type, default: object) -> object:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad_request(f"{name} must be a {kind.__name__}, got {value!r}", param=name)
    return value


def _sampling_params(
    body: dict, max_tokens: object, logprobs: object, renames: dict[str, str]
) -> SamplingParams:
    kwargs = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    if kwargs.get("top_k") == -1:  # vLLM spells "no top-k" as -1; SamplingParams uses 0
        kwargs["top_k"] = 0
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        param = renames.get(field, field)
        raise bad_request(str(exc).replace(field, param, 1), param=param) from None


def _completion_prompt(prompt: object, tokenizer: Tokenizer) -> tuple[int, ...]:
    # A batch of one prompt is accepted (clients often wrap); larger batches would need n>1.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        return tuple(tokenizer.encode(prompt, add_special_tokens=True))
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return tuple(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad_request("batched prompts are not supported: send one prompt", param="prompt")
    raise bad_request(
        "prompt must be a non-empty string or a non-empty list of token ids", param="prompt"
    )


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _chat_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    normalized = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", param="messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                param="messages",
            )
        normalized.append({"role": role, "content": _message_text(message.get("content"), where)})
    return normalized


def _message_text(content: object, where: str) -> str:
    """Plain text of a message: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(f"{where}.content: only text parts are supported", "messages")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content: a text part needs a string text", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string or a list of parts", param="messages")


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
