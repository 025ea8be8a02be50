"""Build OpenAI-shaped response bodies (whole and streamed) from ``OutputDelta``s.

One ``ResponseBuilder`` per request: it turns each delta into a stream chunk and also
accumulates text, logprobs and token counts for the non-streamed body and the ``usage`` block.
"""

from __future__ import annotations

from coordinator.engine_client import Tokenizer
from coordinator.openai_requests import GenerationRequest
from core.outputs import OutputDelta, TokenLogprob


class ResponseBuilder:
    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        request: GenerationRequest,
        tokenizer: Tokenizer,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created
        self.request = request
        self.tokenizer = tokenizer
        self.chat = request.kind == "chat"
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self._logprob_entries: list[TokenLogprob] = []
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._num_output_tokens = 0
        self._text_offset = 0  # completions logprobs: where the next token starts in the text

    # -- accumulation ---------------------------------------------------------------------------

    def add(self, delta: OutputDelta) -> None:
        self.text_parts.append(delta.text)
        self._logprob_entries.extend(delta.logprobs)
        # Engines report cumulative counts; fall back to counting ids if one does not.
        self._num_output_tokens = max(
            self._num_output_tokens + len(delta.token_ids), delta.num_output_tokens
        )
        if delta.num_prompt_tokens:
            self._num_prompt_tokens = delta.num_prompt_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def usage(self) -> dict:
        return {
            "prompt_tokens": self._num_prompt_tokens,
            "completion_tokens": self._num_output_tokens,
            "total_tokens": self._num_prompt_tokens + self._num_output_tokens,
        }

    # -- streamed chunks ------------------------------------------------------------------------

    def _envelope(self, choices: list[dict]) -> dict:
        body = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.request.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return body

    def role_chunk(self) -> dict | None:
        """Chat streams open with the assistant role and empty content, as OpenAI's do."""
        if not self.chat:
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._envelope([choice])

    def chunk(self, delta: OutputDelta) -> dict:
        """The chunk for one delta (call ``add`` first so offsets and counts are current)."""
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text or not delta.finished else {}
        else:
            choice["text"] = delta.text
        choice["logprobs"] = self._logprobs(delta.logprobs) if self.request.want_logprobs else None
        choice["finish_reason"] = delta.finish_reason
        return self._envelope([choice])

    def usage_chunk(self) -> dict:
        body = self._envelope([])
        body["usage"] = self.usage()
        return body

    # -- whole response -------------------------------------------------------------------------

    def final(self) -> dict:
        text = "".join(self.text_parts)
        self._text_offset = 0
        logprobs = self._logprobs(self._logprob_entries) if self.request.want_logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = self.finish_reason
        return {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }

    # -- logprobs -------------------------------------------------------------------------------

    def _logprobs(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict:
        return self._chat_logprobs(entries) if self.chat else self._completion_logprobs(entries)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = []
        for entry in entries:
            top = [item(t, lp) for t, lp in entry.top]
            content.append({**item(entry.token_id, entry.logprob), "top_logprobs": top})
        return {"content": content}

    def _completion_logprobs(self, entries) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for entry in entries:
            text = self._token_text(entry.token_id)
            tokens.append(text)
            token_logprobs.append(entry.logprob)
            top_logprobs.append({self._token_text(t): lp for t, lp in entry.top})
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
