"""A chat request's messages and template knobs -> prompt token ids (chat and /tokenize).

    messages                 [{"role", "content": str | [{"type": "text", "text"}]}]
    add_generation_prompt    open an assistant turn after the messages (default true)
    continue_final_message   leave the final message open for the model to continue (then
                             add_generation_prompt defaults to false; both true is a 400)
    chat_template_kwargs     more variables for the template (e.g. enable_thinking)
"""

from __future__ import annotations

from coordinator.api_errors import bad_request
from coordinator.engine_client import Tokenizer

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# variables the server itself passes to the template
_RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt", "continue_final_message")


def chat_prompt_ids(body: dict, tokenizer: Tokenizer) -> tuple[list[dict], tuple[int, ...]]:
    """(normalized messages, prompt token ids)."""
    messages = chat_messages(body.get("messages"))
    continue_final = _flag(body, "continue_final_message", False)
    add_generation = _flag(body, "add_generation_prompt", not continue_final)
    if continue_final and add_generation:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs must be an object", param="chat_template_kwargs")
    reserved = [k for k in _RESERVED_TEMPLATE_VARS if k in kwargs]
    if reserved:
        raise bad_request(
            f"chat_template_kwargs may not set {reserved[0]} (a request field of its own)",
            param="chat_template_kwargs",
        )
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation,
            continue_final_message=continue_final,
            **kwargs,
        )
    except Exception as exc:  # templates reject conversations by raising anything
        # (jinja's raise_exception -> TemplateError); a template refusing the input is a 400.
        raise bad_request(f"cannot apply the chat template: {exc}", param="messages") from None
    return messages, tuple(ids)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def chat_messages(messages: object) -> list[dict]:
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
