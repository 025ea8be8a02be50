"""CPU memory on 2 MiB pages: the weights a decode step streams and the KV cache, in mappings
that Linux is asked to back with transparent huge pages (``madvise(MADV_HUGEPAGE)``).

Why: a batch-1 step of a quantized model reads its ~100 MB of weights once per token, as ~120
short streams (one per linear, split between the threads), and attention reads each sequence's
K/V as islands of a few KB (a block of one layer). On 4 KiB pages that is tens of thousands of
pages a step, far more than the TLB holds.
Where they outrun the last-level cache (an AMD EPYC guest, 32 MiB L3), measured in alternating
pairs (docs/benchmarks.md, "On 2 MiB pages"): SmolLM2's 30 int4 layers with int8 activations
0.71-0.97x the time, a served decode step 0.93-0.96x, attention over a cold cache 0.91-0.94x.

Where Linux has THP off (``never``), or no ``MADV_HUGEPAGE``, the memory stays on 4 KiB pages:
correct, only not faster.

Memory that others allocate (oneDNN's packed weights, held by its tensors; the float32 weights
MKL reads) cannot be moved: ``collapse_onto_huge_pages`` asks Linux (6.1+, ``MADV_COLLAPSE``) to
back it with huge pages where it lies. A bfloat16 SmolLM2 step on an AMD EPYC: 0.75-1.12x the
time, median ~0.91x (docs/benchmarks.md "bfloat16 decode steps without AMX").
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from pathlib import Path

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)  # Linux's value; Python 3.11's mmap lacks it
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_copies(tensors: list[Tensor]) -> list[Tensor]:
    """Contiguous CPU copies of ``tensors`` (same dtypes, shapes and values) in one anonymous
    mapping aligned to 2 MiB and advised for huge pages. The mapping lives as long as any copy."""
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if size == 0:
        return [t.contiguous() for t in tensors]
    region = _region(size)
    copies = []
    for t, off in zip(tensors, offsets, strict=True):
        view = region[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        copies.append(view)
    return copies


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero CPU tensor in its own mapping, as ``huge_page_copies`` makes them (the KV cache:
    attention reads its blocks as islands of a few KB, one page walk each on 4 KiB pages). Its
    pages are taken as they are first written, not here."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return _region(nbytes)[:nbytes].view(dtype).view(shape)  # an anonymous mapping is zeros


def _region(nbytes: int) -> Tensor:
    """uint8 [>= nbytes] starting on a 2 MiB boundary of a new private anonymous mapping advised
    for huge pages (keeps the mapping alive)."""
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private: an anonymous shared mapping is shmem, whose huge pages have a setting of their own
    # (shmem_enabled, "never" by default); + one huge page to align within it
    buf = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region = torch.frombuffer(buf, dtype=torch.uint8)  # keeps buf alive
    start = -region.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE, start, span)
        except OSError:  # THP not built into this kernel: 4 KiB pages
            pass
    return region[start : start + span]


def collapse_onto_huge_pages(address: int, nbytes: int) -> int:
    """Back the anonymous memory [address, address + nbytes) with 2 MiB pages where it lies
    (``madvise(MADV_COLLAPSE)``, synchronous): each 2 MiB-aligned range it touches, the
    neighbours' bytes in that range included (same values on other pages; a range not wholly
    in one anonymous mapping is left as it is). Returns how many ranges are on huge pages now:
    0 where THP is ``never``, the kernel has no MADV_COLLAPSE (before 6.1) or the memory is not
    anonymous. ~3 ms a range on an AMD EPYC guest (copying and, at times, compacting)."""
    madvise = _madvise()
    if madvise is None or nbytes <= 0:
        return 0
    first, end = address // HUGE_PAGE * HUGE_PAGE, address + nbytes
    return sum(madvise(a, HUGE_PAGE, MADV_COLLAPSE) == 0 for a in range(first, end, HUGE_PAGE))


@functools.cache
def _madvise():
    """libc's madvise, or None where THP is off or absent."""
    try:
        if "[never]" in THP_ENABLED.read_text():
            return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn
