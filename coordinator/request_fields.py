"""Which request fields the server knows: a field it would ignore is refused, never dropped.

A client that sends ``logit_bias`` or ``tools`` and gets free text back would misread it, so
every field of a request body is one of:

- read by the parser (``COMPLETION_FIELDS`` / ``CHAT_FIELDS``);
- a no-op at any value (``NO_OPS``): bookkeeping for OpenAI's service that cannot change the
  output (``user``, ``metadata``, ``store`` ...);
- a no-op at its default only (``DEFAULT_ONLY``): ``best_of=1``, ``logit_bias={}``, ``tools=[]`` ...
  any other value is a 400 naming the field;
- anything else: a 400 naming every unknown field.

``null`` is the same as leaving a known field out. The lists follow OpenAI's request schemas
and vLLM's extensions (vllm/entrypoints/openai/protocol.py).
"""

from __future__ import annotations

from coordinator.api_errors import bad_request

# read by coordinator.openai_requests / structured_request for both endpoints
_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "include_stop_str_in_output", "skip_special_tokens", "stream",
    "stream_options", "prompt_logprobs", "echo", "add_special_tokens", "response_format",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "n",
})  # fmt: skip
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template_kwargs",
    "add_generation_prompt", "continue_final_message",
}  # fmt: skip

NO_OPS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    "parallel_tool_calls",  # only means something with tools, which are refused
})  # fmt: skip

NOT_IMPLEMENTED = "is not supported"
# field -> (the values that change nothing, what to say about any other value)
DEFAULT_ONLY: dict[str, tuple[tuple, str]] = {
    "best_of": ((1,), "only best_of=1 is supported (n choices are: ask for n)"),
    "logit_bias": (({},), NOT_IMPLEMENTED),
    "suffix": (("",), NOT_IMPLEMENTED),
    "tools": (([],), NOT_IMPLEMENTED),
    "functions": (([],), NOT_IMPLEMENTED),
    "tool_choice": (("none", "auto"), "is not supported (no tools): only 'none' or 'auto'"),
    "function_call": (("none", "auto"), "is not supported (no functions): only 'none' or 'auto'"),
    "modalities": ((["text"],), "is not supported: only ['text']"),
    "priority": ((0,), "is not supported: only 0"),
    "use_beam_search": ((False,), NOT_IMPLEMENTED),
    "length_penalty": ((1.0,), "is not supported (no beam search): only 1.0"),
    "spaces_between_special_tokens": ((True,), "is not supported: only true"),
    "guided_decoding_backend": (("xgrammar", "auto"), "must be 'xgrammar' (the only backend)"),
}


def check_fields(body: dict, known: frozenset[str]) -> None:
    """400 for a field the server would otherwise ignore (see the module docstring)."""
    unknown = sorted(k for k in body if k not in known and k not in NO_OPS
                     and k not in DEFAULT_ONLY)  # fmt: skip
    if unknown:
        raise bad_request(
            f"unknown or unsupported field{'s' if len(unknown) > 1 else ''}: "
            f"{', '.join(unknown)}",
            param=unknown[0],
            code="unknown_field",
        )
    for name, (allowed, message) in DEFAULT_ONLY.items():
        value = body.get(name)
        if value is None or any(_same(value, a) for a in allowed):
            continue
        if message.startswith(("is ", "must ")):
            message = f"{name} {message}"
        raise bad_request(f"{message}, got {value!r}", param=name)


def _same(value: object, allowed: object) -> bool:
    """Equal and of the same kind (True is not 1, 1 is 1.0)."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed
    if isinstance(allowed, int | float):
        return isinstance(value, int | float) and value == allowed
    return type(value) is type(allowed) and value == allowed
