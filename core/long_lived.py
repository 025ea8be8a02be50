"""Keep what a process built while starting out of Python's full garbage collections.

A serving process builds most of its objects once (modules, the app, the tokenizer, the model and
its engine) and keeps them until it exits. Python's cyclic collector still walks all of them on
every full (generation 2) collection, which it starts by itself once enough new objects have
survived: in the coordinator, whose event loop carries every stream, such a pass took 78-101 ms
under 64 streams (~110k objects); a worker holds ~270k, and its explicit full pass took ~140 ms
(docs/benchmarks.md). ``gc.freeze`` moves every object alive into a generation the collector
never walks; refcounting still frees them. Call it once, where a process's start ends, and only in
a process that lives for what it serves (not in one that builds and drops many engines, as the
tests do: frozen cycles are never collected).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Frozen:
    objects: int  # in the permanent generation after the call
    seconds: float  # the collection before the freeze, and the freeze


def freeze_long_lived() -> Frozen:
    """Collect first (garbage frozen would never be freed), then freeze what is left."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return Frozen(gc.get_freeze_count(), time.perf_counter() - start)
