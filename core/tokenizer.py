"""Torch-free tokenizer: HF ``tokenizers`` for text <-> ids, jinja2 for the chat template.

Built from a ``TokenizerFiles`` (plain strings, so it crosses Ray and msgpack), which
``engine.tokenizer_files.load_tokenizer_files`` produces from a GGUF file or a HF directory. The
coordinator imports this module, so it must never import torch or transformers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


@dataclass(frozen=True)
class TokenizerFiles:
    """Everything needed to rebuild a model's tokenizer, as plain data.

    ``tokenizer_json`` is the serialized ``tokenizers.Tokenizer``; its post-processor decides
    which special tokens ``encode`` adds, and ``add_bos_token`` says whether that includes BOS
    (checked when a Tokenizer is built). ``eos_token_ids`` are all ids that end generation (the
    tokenizer's EOS plus any the model / generation config lists).
    """

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False

    def __post_init__(self) -> None:
        if not self.tokenizer_json:
            raise ValueError("TokenizerFiles.tokenizer_json is empty")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    def special_tokens_map(self) -> dict[str, str]:
        """The names a chat template may use (``bos_token``, ``eos_token``, ...), as
        transformers passes them to ``render``."""
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {name: value for name in names if (value := getattr(self, name)) is not None}

    def to_dict(self) -> dict[str, Any]:
        """msgpack/JSON-safe form (tuples become lists)."""
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerFiles:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TokenizerFiles fields: {', '.join(unknown)}")
        return cls(**data)


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # the marker transformers uses


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; transformers overrides it like this, so templates that
    # serialize tool schemas render the same bytes.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template the way transformers does: a sandbox (templates ship with model
    files and are untrusted code), trim_blocks/lstrip_blocks, loop controls, and the helpers
    templates call (raise_exception, strftime_now, tojson)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


class Tokenizer:
    """encode / decode / chat template of one model; thread-safe for reads."""

    def __init__(self, files: TokenizerFiles) -> None:
        self.files = files
        self._tok = HFTokenizer.from_str(files.tokenizer_json)
        self._template = (
            compile_chat_template(files.chat_template) if files.chat_template else None
        )
        # BOS is added by the tokenizer.json post-processor alone (transformers 5 ignores a
        # tokenizer_config "add_bos_token" that disagrees with it); the flag must describe it.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        adds_bos = bool(probe) and probe[0] == files.bos_token_id
        if adds_bos != files.add_bos_token:
            raise ValueError(
                f"TokenizerFiles.add_bos_token={files.add_bos_token} but the tokenizer's "
                f"post-processor {'adds' if adds_bos else 'does not add'} BOS"
            )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.files.eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.files.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be below the model's vocab_size,
        whose embedding rows are often padded)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int] | tuple[int, ...], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Bytes of an incomplete UTF-8 sequence decode to U+FFFD (see
        core.detokenizer for streaming). No ``clean_up_tokenization_spaces``: transformers
        skips it for BPE tokenizers, which every Llama-family tokenizer is."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (e.g. ``Ġthe`` in a byte-level BPE); None if out of range."""
        return self._tok.id_to_token(token_id)

    def apply_chat_template_text(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The rendered prompt; ``kwargs`` reach the template (e.g. ``tools``).
        ``continue_final_message``: cut the text right after the final message's content, so
        that the model continues it (as transformers does; ValueError if the template drops
        that content)."""
        if self._template is None:
            raise ValueError("this model's tokenizer has no chat template")
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts, got {message!r}")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        if continue_final_message:  # transformers' way: mark the end of the content, cut there
            final = messages[-1]
            content = final.get("content")
            if not isinstance(content, str):
                raise ValueError("continue_final_message needs a final message with text content")
            messages = [*messages[:-1], {**final, "content": content + _CONTINUE_TAG}]
        context = {"tools": None, "documents": None, **self.files.special_tokens_map(), **kwargs}
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )
        if continue_final_message:
            tag = _CONTINUE_TAG.strip()
            if tag not in text:
                raise ValueError("continue_final_message: the chat template does not render the "
                                 "final message's content")  # fmt: skip
            at = text.rindex(tag)
            # a template that keeps the content's trailing spacing keeps the tag's space too
            text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else (
                text[:at].rstrip())  # fmt: skip
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered prompt. The template writes any BOS itself, so the text is
        encoded without special tokens, as transformers does."""
        text = self.apply_chat_template_text(
            messages, add_generation_prompt, continue_final_message, **kwargs
        )
        return self.encode(text, add_special_tokens=False)
