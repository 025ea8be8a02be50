"""Build OpenAI-shaped response bodies (whole and streamed) from ``OutputDelta``s.

One ``ResponseBuilder`` per request: it turns each delta of choice ``index`` into a stream chunk
and also accumulates text, logprobs and token counts per choice for the non-streamed body and
the ``usage`` block. With n > 1 choices, ``usage`` counts the prompt once and sums the choices'
completion tokens; the prompt's logprobs and cached-token count come from choice 0 (every choice
has the same prompt). Beyond OpenAI's fields, as vLLM has them: ``stop_reason`` (the stop string
or stop token id that ended the choice; null for EOS and length) and ``prompt_logprobs`` (when
asked: null for the first prompt token, then ``{token_id: {"logprob", "rank",
"decoded_token"}}`` per position, ``rank`` null for a token outside the top k). Echoed text
(and, with logprobs, the prompt's tokens) leads each choice's first chunk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from coordinator.engine_client import Tokenizer
from coordinator.openai_requests import GenerationRequest
from core.outputs import FINISH_LENGTH, OutputDelta, TokenLogprob

# (token id, logprob, top alternatives): a prompt's first token has neither
_Row = tuple[int, float | None, tuple[tuple[int, float], ...] | None]


@dataclass(eq=False)
class _ChoiceState:
    """What one choice has produced so far."""

    text_parts: list[str] = field(default_factory=list)
    logprob_entries: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    text_offset: int = 0  # completions logprobs: where the next token starts in the text
    started: bool = False  # the first content chunk (with any echo) went out


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
        self.choices = [_ChoiceState() for _ in range(request.n)]
        self._prompt_logprobs: tuple[TokenLogprob, ...] = ()
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._num_cached_tokens = 0

    @property
    def finish_reason(self) -> str | None:
        """Choice 0's (the request's outcome in metrics)."""
        return self.choices[0].finish_reason

    # -- accumulation ---------------------------------------------------------------------------

    def add(self, index: int, delta: OutputDelta) -> None:
        choice = self.choices[index]
        if index == 0:  # the prompt's: a choice i > 0 reuses choice 0's prompt blocks
            if delta.prompt_logprobs:
                self._prompt_logprobs = delta.prompt_logprobs
            self._num_cached_tokens = max(self._num_cached_tokens, delta.num_cached_tokens)
            if delta.num_prompt_tokens:
                self._num_prompt_tokens = delta.num_prompt_tokens
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if self.request.drop_output:  # max_tokens 0: what ended the hidden token is moot
                choice.finish_reason, choice.stop_reason = FINISH_LENGTH, None
        if self.request.drop_output:
            return
        choice.text_parts.append(delta.text)
        choice.logprob_entries.extend(delta.logprobs)
        # Engines report cumulative counts; fall back to counting ids if one does not.
        choice.num_output_tokens = max(
            choice.num_output_tokens + len(delta.token_ids), delta.num_output_tokens
        )

    def usage(self) -> dict:
        num_output = sum(c.num_output_tokens for c in self.choices)
        return {
            "prompt_tokens": self._num_prompt_tokens,
            "completion_tokens": num_output,
            "total_tokens": self._num_prompt_tokens + num_output,
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

    def role_chunks(self) -> list[dict]:
        """Chat streams open with the assistant role and empty content, one chunk per choice,
        as OpenAI's do."""
        if not self.chat:
            return []
        return [
            self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
            for i in range(len(self.choices))
        ]  # fmt: skip

    def chunk(self, index: int, delta: OutputDelta) -> dict:
        """The chunk for one delta of choice ``index`` (call ``add`` first so offsets and
        counts are current)."""
        state = self.choices[index]
        first, state.started = not state.started, True
        drop = self.request.drop_output
        text = "" if drop else delta.text
        if first and self.request.echo_text:
            text = self.request.echo_text + text
        choice: dict = {"index": index}
        if self.chat:
            choice["delta"] = {"content": text} if text or not delta.finished else {}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        if self.request.want_logprobs:
            entries = () if drop else delta.logprobs
            choice["logprobs"] = self._logprobs(state, entries, with_prompt=first)
        choice["finish_reason"] = state.finish_reason if delta.finished else None
        choice["stop_reason"] = state.stop_reason if delta.finished else None
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
        choices = []
        for index, state in enumerate(self.choices):
            text = (self.request.echo_text or "") + "".join(state.text_parts)
            state.text_offset = 0
            logprobs = None
            if self.request.want_logprobs:
                logprobs = self._logprobs(state, state.logprob_entries, with_prompt=True)
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": index, "text": text}
            choice["logprobs"] = logprobs
            choice["finish_reason"] = state.finish_reason
            choice["stop_reason"] = state.stop_reason
            choices.append(choice)
        body = {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.chat:
            self._add_prompt_logprobs(body, choices[0])
        else:
            for choice in choices:
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

    def _logprobs(
        self, state: _ChoiceState, entries: Iterable[TokenLogprob], with_prompt: bool
    ) -> dict:
        """``with_prompt``: completions echo puts the prompt's tokens first."""
        if self.chat:
            return self._chat_logprobs(entries)
        rows: list[_Row] = []
        if with_prompt and self.request.echo_logprobs:
            rows.append((self.request.prompt_token_ids[0], None, None))
            rows += [(e.token_id, e.logprob, e.top) for e in self._prompt_logprobs]
        rows += [(e.token_id, e.logprob, e.top) for e in entries]
        return self._completion_logprobs(state, rows)

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

    def _completion_logprobs(self, state: _ChoiceState, rows: list[_Row]) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, logprob, top in rows:
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(logprob)
            top_logprobs.append(None if top is None else {self._token_text(t): v for t, v in top})
            offsets.append(state.text_offset)
            state.text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
