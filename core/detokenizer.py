"""Streaming detokenization: text of each new token batch, spaces right, no broken characters.

Decoding one token at a time is wrong twice over: byte-level BPE splits a character such as an
emoji or a rare CJK ideograph across several tokens (each alone decodes to U+FFFD), and
sentencepiece decoders drop the leading space of the first token they see. So, as in vLLM's
``detokenize_incrementally`` and TGI, we decode a short window of already-emitted tokens
together with the new ones and emit only the difference:

    token_ids:  [ ... prompt / earlier output ... | tokens pending ]
                        ^ prefix_offset   ^ read_offset            ^ len(token_ids)
    prefix_text = decode(token_ids[prefix_offset:read_offset])   (already emitted)
    new_text    = decode(token_ids[prefix_offset:])
    emit new_text[len(prefix_text):]   unless it ends in U+FFFD (an incomplete character)

Text is held back (offsets unchanged) while the window ends in U+FFFD or adds no characters
(a skipped special token); the window therefore stays a few tokens long.

Known limit, shared with vLLM: a byte-fallback decoder (Llama-2 style ``<0xNN>`` tokens) turns
a whole run of byte tokens into U+FFFDs when the run is invalid UTF-8, so if a model emits an
ASCII byte token followed by a stray continuation byte, the ASCII character already streamed
differs from the final full decode. Valid output always matches.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first output token: enough context for the decoder's
# space handling and for a character split across the prompt/output boundary.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas, one ``push`` per engine step.

    Invariant: ``"".join(pushes) + flush()`` equals the text of the output tokens decoded in
    the context of the prompt, which for a request without a prompt is exactly
    ``tokenizer.decode(output_ids, skip_special_tokens)``; no pushed chunk ends in a partial
    character (U+FFFD) — ``flush`` at finish hands out whatever is left, complete or not.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.prefix_offset = max(len(self.token_ids) - PROMPT_CONTEXT_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""  # everything emitted so far

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(
            self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens
        )

    def _advance(self, allow_incomplete: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        if self.read_offset == self.num_prompt_tokens:
            # A prompt given as ids may end inside a character (emitted text never does): that
            # U+FFFD is not in the output, the character completed by output bytes will be.
            prefix_text = prefix_text.rstrip(REPLACEMENT_CHAR)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text):
            return ""  # nothing visible yet (e.g. a skipped special token): keep the window
        if new_text.endswith(REPLACEMENT_CHAR) and not allow_incomplete:
            return ""  # a character is still split across tokens: wait for its last byte
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def push(self, token_ids: Sequence[int]) -> str:
        """Append new output tokens; returns only the text they complete (maybe "")."""
        self.token_ids.extend(int(t) for t in token_ids)
        return self._advance(allow_incomplete=False)

    def flush(self) -> str:
        """At finish: the held-back text, even if it ends in an incomplete character."""
        return self._advance(allow_incomplete=True)
