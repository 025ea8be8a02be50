"""Build OpenAI-shaped response bodies (whole and streamed) from ``OutputDelta``s.

One ``ResponseBuilder`` per request: it turns each delta into a stream chunk and also
accumulates text, logprobs and token counts for the non-streamed body and the ``usage`` block.
Beyond OpenAI's fields, as vLLM has them: ``stop_reason`` (the stop string or stop token id that
ended the choice; null for EOS and length) and ``prompt_logprobs`` (when asked: null for the
first prompt token, then ``{token_id: {"logprob", "rank", "decoded_token"}}`` per position,
``rank`` null for a token outside the top k). Echoed text (and, with logprobs, the prompt's
tokens) leads the first chunk.
"""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.engine_client import Tokenizer
from coordinator.openai_requests import GenerationRequest
from core.outputs import FINISH_LENGTH, OutputDelta, TokenLogprob

# (token id, logprob, top alternatives): a prompt's first token has neither
_Row = tuple[int, float | None, tuple[tuple[int, float], ...] | None]


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
        self.stop_reason: str | int | None = None
        self._logprob_entries: list[TokenLogprob] = []
        self._prompt_logprobs: tuple[TokenLogprob, ...] = ()
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._num_output_tokens = 0
        self._num_cached_tokens = 0
        self._text_offset = 0  # completions logprobs: where the next token starts in the text
        self._started = False  # the first content chunk (with any echo) went out

    # -- accumulation ---------------------------------------------------------------------------

    def add(self, delta: OutputDelta) -> None:
        if delta.prompt_logprobs:
            self._prompt_logprobs = delta.prompt_logprobs
        self._num_cached_tokens = max(self._num_cached_tokens, delta.num_cached_tokens)
        if delta.num_prompt_tokens:
            self._num_prompt_tokens = delta.num_prompt_tokens
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
            if self.request.drop_output:  # max_tokens 0: what ended the hidden token is moot
                self.finish_reason, self.stop_reason = FINISH_LENGTH, None
        if self.request.drop_output:
            return
        self.text_parts.append(delta.text)
        self._logprob_entries.extend(delta.logprobs)
        # Engines report cumulative counts; fall back to counting ids if one does not.
        self._num_output_tokens = max(
            self._num_output_tokens + len(delta.token_ids), delta.num_output_tokens
        )

    def usage(self) -> dict:
        return {
            "prompt_tokens": self._num_prompt_tokens,
            "completion_tokens": self._num_output_tokens,
            "total_tokens": self._num_prompt_tokens + self._num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": self._num_cached_tokens},
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
        if self.request.continuous_usage:
            body["usage"] = self.usage()
        elif self.request.include_usage:
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
        first, self._started = not self._started, True
        drop = self.request.drop_output
        text = ("" if drop else delta.text)
        if first and self.request.echo_text:
            text = self.request.echo_text + text
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": text} if text or not delta.finished else {}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        if self.request.want_logprobs:
            entries = () if drop else delta.logprobs
            choice["logprobs"] = self._logprobs(entries, with_prompt=first)
        choice["finish_reason"] = self.finish_reason if delta.finished else None
        choice["stop_reason"] = self.stop_reason if delta.finished else None
        body = self._envelope([choice])
        if first:
            self._add_prompt_logprobs(body, choice)
        return body

    def usage_chunk(self) -> dict:
        body = self._envelope([])
        body["usage"] = self.usage()
        return body

    # -- whole response -------------------------------------------------------------------------

    def final(self) -> dict:
        text = (self.request.echo_text or "") + "".join(self.text_parts)
        self._text_offset = 0
        logprobs = None
        if self.request.want_logprobs:
            logprobs = self._logprobs(self._logprob_entries, with_prompt=True)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = self.finish_reason
        choice["stop_reason"] = self.stop_reason
        body = {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }
        self._add_prompt_logprobs(body, choice)
        return body

    # -- logprobs -------------------------------------------------------------------------------

    def _add_prompt_logprobs(self, body: dict, choice: dict) -> None:
        """vLLM's places: in the choice for completions, top level for chat."""
        if self.request.want_prompt_logprobs:
            (body if self.chat else choice)["prompt_logprobs"] = self._prompt_logprobs_body()

    def _prompt_logprobs_body(self) -> list[dict | None]:
        out: list[dict | None] = [None]  # the first prompt token has no context
        for entry in self._prompt_logprobs:
            ranked = {t: (lp, rank) for rank, (t, lp) in enumerate(entry.top, 1)}
            ids = [entry.token_id, *(t for t in ranked if t != entry.token_id)]
            out.append({
                str(t): {
                    "logprob": entry.logprob if t == entry.token_id else ranked[t][0],
                    "rank": ranked[t][1] if t in ranked else None,
                    "decoded_token": self._token_text(t),
                }
                for t in ids
            })  # fmt: skip
        return out

    def _logprobs(self, entries: Iterable[TokenLogprob], with_prompt: bool) -> dict:
        """``with_prompt``: completions echo puts the prompt's tokens first."""
        if self.chat:
            return self._chat_logprobs(entries)
        rows: list[_Row] = []
        if with_prompt and self.request.echo_logprobs:
            rows.append((self.request.prompt_token_ids[0], None, None))
            rows += [(e.token_id, e.logprob, e.top) for e in self._prompt_logprobs]
        rows += [(e.token_id, e.logprob, e.top) for e in entries]
        return self._completion_logprobs(rows)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: Iterable[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = []
        for entry in entries:
            top = [item(t, lp) for t, lp in entry.top]
            content.append({**item(entry.token_id, entry.logprob), "top_logprobs": top})
        return {"content": content}

    def _completion_logprobs(self, rows: list[_Row]) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, logprob, top in rows:
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(logprob)
            top_logprobs.append(None if top is None else {self._token_text(t): v for t, v in top})
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
