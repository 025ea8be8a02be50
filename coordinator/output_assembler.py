"""Worker deltas (token ids only) -> the front end's deltas (text, stop strings applied).

Tokens of one request come from two workers over one PULL socket: token 1 from prefill, tokens
2.. from decode. ZMQ orders frames per sender only, so a decode delta could overtake the prefill
one; deltas carry the cumulative ``num_output_tokens``, which places each of them::

    start = num_output_tokens - len(token_ids)      # index of its first token in the output
    start == self.num_tokens  -> apply now (then any stashed delta that now fits)
    start >  self.num_tokens  -> stash until the gap is filled

Stop strings are matched here (workers do not see text); a hit truncates the tokens after the
one that completed it and sets ``stopped_here``: the caller must then abort the workers, which
do not know the request ended.
"""

from __future__ import annotations

import logging

from core.outputs import FAILURES, FINISH_ERROR, FINISH_STOP, OutputDelta
from core.sampling_params import SamplingParams
from core.text_state import TextState
from core.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class OutputAssembler:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.text = TextState(tokenizer, prompt_token_ids, params)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = []  # output tokens passed on so far
        self.finished = False
        self.stopped_here = False  # a stop string ended it: the workers still hold it
        self._stash: dict[int, OutputDelta] = {}  # start index -> a delta that came early

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def forget_pending(self) -> None:
        """A new attempt starts after ``token_ids``: deltas stashed from the last one are void."""
        self._stash.clear()

    def fail(self, message: str, fault: str | None = None) -> OutputDelta:
        """End the request with an error the coordinator decided on."""
        return self.push(OutputDelta("", (), finish_reason=FINISH_ERROR, error=message,
                                     fault=fault))[0]  # fmt: skip

    def push(self, delta: OutputDelta) -> list[OutputDelta]:
        """The deltas to hand out now (possibly none; the last one may be finished)."""
        if self.finished:
            return []
        if delta.finish_reason in FAILURES:
            # A failure ends the request whatever is still in flight.
            self.finished = True
            return [self._final_failure(delta)]
        # a worker that leaves the count at 0 is taken to be in order
        start = delta.num_output_tokens - len(delta.token_ids) if delta.num_output_tokens else None
        if start is None:
            start = self.num_tokens
        if start > self.num_tokens:
            self._stash[start] = delta
            return []
        if start < self.num_tokens:
            log.warning("dropping a repeated delta of %s at %d", delta.request_id, start)
            return []
        out = [self._apply(delta)]
        while not self.finished and self.num_tokens in self._stash:
            out.append(self._apply(self._stash.pop(self.num_tokens)))
        return out

    def _apply(self, delta: OutputDelta) -> OutputDelta:
        tokens = list(delta.token_ids)
        finish, stop_reason = delta.finish_reason, delta.stop_reason
        # An EOS / stop-id token that ended the request is not part of the text (as in the
        # in-process engine); the worker has already applied those rules.
        text_tokens = tokens[:-1] if finish == FINISH_STOP and tokens else tokens
        for i, token in enumerate(text_tokens):
            hit = self.text.push([token])
            if hit is not None:  # a stop string outranks max_tokens / EOS on a later token
                tokens, finish, stop_reason = tokens[: i + 1], FINISH_STOP, hit
                self.stopped_here = True
                break
        self.token_ids.extend(tokens)
        self.finished = finish is not None
        return OutputDelta(
            request_id=delta.request_id,
            token_ids=tuple(tokens),
            text=self.text.take(self.finished),
            logprobs=delta.logprobs[: len(tokens)],
            prompt_logprobs=delta.prompt_logprobs,
            finish_reason=finish,
            num_prompt_tokens=delta.num_prompt_tokens or self.num_prompt_tokens,
            num_output_tokens=self.num_tokens,
            error=delta.error,
            stop_reason=stop_reason,
            num_cached_tokens=delta.num_cached_tokens,
        )

    def _final_failure(self, delta: OutputDelta) -> OutputDelta:
        return OutputDelta(
            request_id=delta.request_id,
            token_ids=(),
            finish_reason=delta.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_tokens,
            error=delta.error or f"request {delta.finish_reason}",
            fault=delta.fault,
        )
