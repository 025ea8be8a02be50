"""Compiled grammars, compiled on one background thread and kept (LRU) for reuse.

``get(spec)`` never blocks: it returns a Future, already done on a hit. A caller polls
``done()``; the engine keeps a sequence out of the scheduler until then, so a compile (ms for a
small schema, up to seconds for a big grammar over a large vocabulary) never stalls a step.
The first request also pays for building the compiler (the vocabulary; for a worker without a
tokenizer, loading the tokenizer files), on the same thread. Failures are cached too: a bad spec
sent again fails again at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from core.structured_output import StructuredOutput
from engine.structured.grammar_compiler import GrammarCompiler

log = logging.getLogger(__name__)

MAX_ENTRIES = 256


class GrammarCache:
    def __init__(
        self, make_compiler: Callable[[], GrammarCompiler], max_entries: int = MAX_ENTRIES
    ) -> None:
        self._make_compiler = make_compiler
        self._compiler: GrammarCompiler | None = None
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._todo: queue.SimpleQueue[tuple[StructuredOutput, Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()  # set after each compile: waiters re-check
        self.num_compiles = 0
        self.compile_seconds = 0.0  # compiles only (not building the compiler)

    def get(self, spec: StructuredOutput) -> Future:
        with self._lock:
            future = self._entries.get(spec.key)
            if future is not None:
                self._entries.move_to_end(spec.key)
                return future
            future = Future()
            self._entries[spec.key] = future
            while len(self._entries) > self._max_entries:  # holders keep evicted futures
                self._entries.popitem(last=False)
            if self._thread is None:
                # a daemon: a compile still running must not keep a stopping worker alive
                self._thread = threading.Thread(target=self._run, name="grammar", daemon=True)
                self._thread.start()
        self._todo.put((spec, future))
        return future

    def _run(self) -> None:
        while True:
            spec, future = self._todo.get()
            try:
                future.set_result(self._compile(spec))
            except Exception as exc:
                future.set_exception(exc)
            self.finished.set()

    def _compile(self, spec: StructuredOutput) -> Any:
        if self._compiler is None:
            start = time.perf_counter()
            self._compiler = self._make_compiler()
            log.info("grammar compiler ready in %.2fs", time.perf_counter() - start)
        start = time.perf_counter()
        try:
            return self._compiler.compile(spec)
        finally:
            self.num_compiles += 1
            self.compile_seconds += time.perf_counter() - start
