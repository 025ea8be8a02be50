"""vLLM's tokenizer endpoints, answered by the coordinator's own tokenizer (no worker involved).

    POST /tokenize    {"prompt": str, "add_special_tokens": true}
                      | {"messages": [...], "add_generation_prompt", "continue_final_message",
                         "chat_template_kwargs"}
                      (+ "model", "return_token_strs")
                   -> {"count", "max_model_len", "tokens", "token_strs": [...] | null}
    POST /detokenize  {"tokens": [int], "model"} -> {"prompt": str}
"""

from __future__ import annotations

from coordinator.api_errors import bad_request
from coordinator.chat_prompt import chat_prompt_ids
from coordinator.engine_client import Tokenizer
from coordinator.openai_requests import ServingLimits, model_not_found
from coordinator.request_fields import check_fields

_COMMON = frozenset({"model", "return_token_strs"})
_PROMPT_FIELDS = _COMMON | {"prompt", "add_special_tokens"}
_CHAT_FIELDS = _COMMON | {"messages", "add_generation_prompt", "continue_final_message",
                          "chat_template_kwargs"}  # fmt: skip


def tokenize(body: dict, limits: ServingLimits, tokenizer: Tokenizer) -> dict:
    chat = "messages" in body
    check_fields(body, _CHAT_FIELDS if chat else _PROMPT_FIELDS)
    _check_model(body, limits)
    if chat:
        _, ids = chat_prompt_ids(body, tokenizer)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string (or send messages)", param="prompt")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise bad_request("add_special_tokens must be a boolean", "add_special_tokens")
        ids = tuple(tokenizer.encode(prompt, add_special_tokens=add_special))
    want_strs = body.get("return_token_strs", False)
    if not isinstance(want_strs, bool | None):
        raise bad_request("return_token_strs must be a boolean", param="return_token_strs")
    return {
        "count": len(ids),
        "max_model_len": limits.max_model_len,
        "tokens": list(ids),
        "token_strs": [tokenizer.id_to_token(i) for i in ids] if want_strs else None,
    }


def detokenize(body: dict, limits: ServingLimits, tokenizer: Tokenizer) -> dict:
    check_fields(body, frozenset({"model", "tokens"}))
    _check_model(body, limits)
    tokens = body.get("tokens")
    vocab = tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise bad_request("tokens must be a list of token ids", param="tokens")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": tokenizer.decode(tokens)}


def _check_model(body: dict, limits: ServingLimits) -> None:
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise model_not_found(str(model), limits)
