"""Sequences with structured output wait here, outside the scheduler, until their grammar is
compiled; then they get their matcher and join the scheduler (waiting, or running when their
KV is already in place: a decode worker's hand-off).

    park(seq, running)   -> compile requested (or found in the cache)
    take_ready()         -> (ready, failed): ready ones carry ``seq.grammar``; failed ones carry
                            the finish reason (rejected: a bad spec; error: anything else)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from core.outputs import FINISH_ERROR, FINISH_REJECTED
from core.sampling_params import SamplingParams
from core.tokenizer import TokenizerFiles
from engine.sequence import Sequence
from engine.structured.grammar_cache import GrammarCache
from engine.structured.grammar_compiler import GrammarCompiler, GrammarError
from engine.structured.grammar_state import GrammarState


@dataclass(frozen=True)
class Parked:
    seq: Sequence
    running: bool  # its KV is in place: it joins the running batch, not the queue
    grammar: Future


@dataclass(frozen=True)
class Failed:
    seq: Sequence
    finish_reason: str
    error: str


class GrammarAdmission:
    def __init__(
        self,
        load_tokenizer_files: Callable[[], TokenizerFiles],
        vocab_size: int,
        stop_token_ids: Iterable[int],
    ) -> None:
        stops = tuple(stop_token_ids)
        self.cache = GrammarCache(
            lambda: GrammarCompiler(load_tokenizer_files(), vocab_size, stops)
        )
        self.parked: dict[str, Parked] = {}

    @property
    def num_parked(self) -> int:
        return len(self.parked)

    def prepare(self, params: SamplingParams) -> None:
        """Start compiling ahead of the request's arrival (a decode worker's reservation)."""
        if params.structured is not None:
            self.cache.get(params.structured)

    def park(self, seq: Sequence, running: bool) -> None:
        assert seq.params.structured is not None
        self.parked[seq.request_id] = Parked(seq, running, self.cache.get(seq.params.structured))

    def take_ready(self) -> tuple[list[Parked], list[Failed]]:
        ready: list[Parked] = []
        failed: list[Failed] = []
        for rid, entry in list(self.parked.items()):
            if not entry.grammar.done():
                continue
            del self.parked[rid]
            seq = entry.seq
            try:
                seq.grammar = GrammarState(entry.grammar.result(), seq.output_token_ids)
            except GrammarError as exc:
                failed.append(Failed(seq, FINISH_REJECTED, str(exc)))
                continue
            except Exception as exc:
                failed.append(Failed(seq, FINISH_ERROR, f"structured output: {exc}"))
                continue
            ready.append(entry)
        return ready, failed

    def abort(self, request_ids: Iterable[str]) -> list[Sequence]:
        return [p.seq for rid in request_ids if (p := self.parked.pop(rid, None)) is not None]

    def wait(self, timeout_s: float) -> None:
        """Nap until a compile finishes (or ``timeout_s``): for an engine with nothing else."""
        self.cache.finished.wait(timeout_s)
        self.cache.finished.clear()
