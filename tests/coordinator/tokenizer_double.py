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
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
