"""Per-request text state: incremental detokenization and stop strings (torch-free: the
coordinator runs it for requests served by workers).

Stop strings are matched on text, so they live here rather than in the sampler. While a request
streams, the last ``len(longest stop) - 1`` characters are held back: they might be the start of
a stop string, and text sent to a client cannot be taken back.
"""

from __future__ import annotations

from core.detokenizer import IncrementalDetokenizer
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer


class TextState:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_ids=prompt_ids, skip_special_tokens=params.skip_special_tokens
        )
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all output text so far (truncated at a stop string once one is hit)
        self.emitted = 0  # chars of ``text`` already handed out
        self.stopped = False  # a stop string cut the text: nothing after it may appear

    def push(self, token_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one completed (text is then truncated)."""
        before = len(self.text)
        self.text += self.detok.push(token_ids)
        if not self.stops:
            return None
        # a stop string may straddle the old and the new text
        start = max(0, before - self.hold)
        best: tuple[int, str] | None = None
        for stop in self.stops:
            k = self.text.find(stop, start)
            if k != -1 and (best is None or k < best[0]):
                best = (k, stop)
        if best is None:
            return None
        k, stop = best
        self.stopped = True
        self.text = self.text[: k + len(stop) if self.include_stop else k]
        return stop

    def take(self, finished: bool) -> str:
        """Text not yet handed out (all of it once finished)."""
        if finished and not self.stopped:  # held-back bytes of an unfinished character
            self.text += self.detok.flush()
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
