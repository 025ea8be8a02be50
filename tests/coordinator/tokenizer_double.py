"""A byte-level tokenizer: a test double of the coordinator's ``Tokenizer`` boundary.

Exact and reversible (token id = UTF-8 byte, 256 = BOS), so tests can predict every id. The real
tokenizer (``core.tokenizer``, built from the model's GGUF/HF files) implements the same Protocol.
"""

from __future__ import annotations

BOS_ID = 256


class ByteTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_special_tokens else ids

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: object,
    ) -> list[int]:
        """``<|role|>content\n`` per message; a template kwarg ``system_note`` is written first;
        continue_final_message leaves the last message without its newline."""
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if "system_note" in template_kwargs:
            text = f"[{template_kwargs['system_note']}]" + text
        if continue_final_message:
            text = text[:-1]
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str | None:
        if token_id == BOS_ID:
            return "<s>"
        return chr(token_id) if 0 <= token_id < 256 else None

    @property
    def vocab_size(self) -> int:
        return BOS_ID + 1
