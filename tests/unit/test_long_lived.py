"""core/long_lived.py: garbage made before the call is collected, not frozen; what is alive is
moved out of the collector's reach (gc.get_objects no longer lists it) and counted."""

from __future__ import annotations

import gc
import weakref

from core.long_lived import freeze_long_lived


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def test_collects_then_freezes() -> None:
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection between here and the call
    gc.unfreeze()
    try:
        dropped = weakref.ref(cycle())  # unreachable, but a cycle: only the collector frees it
        kept = cycle()
        assert dropped() is not None
        frozen = freeze_long_lived()
        assert dropped() is None
        assert frozen.objects == gc.get_freeze_count() > 0 and frozen.seconds >= 0
        assert not any(obj is kept for obj in gc.get_objects())
        after = cycle()  # made after the call: the collector still sees it
        assert any(obj is after for obj in gc.get_objects())
        gc.unfreeze()
        assert any(obj is kept for obj in gc.get_objects())
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
