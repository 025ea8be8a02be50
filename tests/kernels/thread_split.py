"""Shared check for kernels whose calls split work between threads (csrc/work_ranges.h)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def same_on_two_threads(call: Callable[[torch.Tensor], torch.Tensor], xs: Sequence[torch.Tensor],
                        calls: int = 300) -> None:  # fmt: skip
    """Two threads split a call's work, and one done early takes chunks from the back of the
    other's range: over ``calls`` calls alternating between the inputs ``xs`` every output equals
    the one-thread result bit for bit (a chunk skipped would keep the other input's values, or
    garbage; one computed twice would race)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [call(x) for x in xs]
        torch.set_num_threads(2)
        for i in range(calls):
            assert torch.equal(call(xs[i % len(xs)]), want[i % len(xs)]), i
    finally:
        torch.set_num_threads(threads)
