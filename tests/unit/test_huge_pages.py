"""engine.huge_pages: equal copies in one 2 MiB-aligned mapping advised for huge pages, and
memory allocated elsewhere collapsed onto huge pages in place."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from engine.huge_pages import (
    HUGE_PAGE,
    collapse_onto_huge_pages,
    huge_page_copies,
    huge_page_zeros,
)

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_field(address: int, key: str) -> list[str]:
    """The words after ``key`` (e.g. "VmFlags:") in the /proc/self/smaps entry of the mapping
    holding ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == key:
            return line.split()[1:]
    raise AssertionError(f"{address:#x} is in no mapping")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address``."""
    return mapping_field(address, "VmFlags:")


def anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping holding ``address``."""
    return int(mapping_field(address, "AnonHugePages:")[0])


def test_copies_are_equal_aligned_and_outlive_the_originals():
    g = torch.Generator().manual_seed(0)
    originals = [torch.randint(0, 255, (3, 7, 16, 4), dtype=torch.uint8, generator=g),
                 torch.randn(5, 3, generator=g).half(), torch.randn(1000, generator=g),
                 torch.empty(0, 4), torch.randn(4, 6, generator=g).t()]  # fmt: skip
    copies = huge_page_copies(originals)
    for o, c in zip(originals, copies, strict=True):
        assert c.dtype == o.dtype and c.shape == o.shape and c.is_contiguous()
        assert torch.equal(c, o) and (c.data_ptr() != o.data_ptr() or not o.numel())
    assert copies[0].data_ptr() % HUGE_PAGE == 0
    assert all(c.data_ptr() % 64 == 0 for c in copies if c.numel())
    expected = [o.clone() for o in originals]
    del originals
    gc.collect()
    copies[2].add_(1)  # still writable memory of ours
    assert torch.equal(copies[2], expected[2] + 1) and torch.equal(copies[0], expected[0])


@pytest.mark.skipif(not THP.exists(), reason="no transparent huge pages in this kernel")
def test_the_mapping_is_advised_for_huge_pages():
    (copy,) = huge_page_copies([torch.ones(3 << 20, dtype=torch.uint8)])
    assert "hg" in vm_flags(copy.data_ptr())  # MADV_HUGEPAGE


def test_zeros_are_zeros_of_the_shape_and_dtype():
    z = huge_page_zeros((5, 3, 2, 16, 3, 64), torch.bfloat16)
    assert z.shape == (5, 3, 2, 16, 3, 64) and z.dtype == torch.bfloat16 and z.is_contiguous()
    assert z.data_ptr() % HUGE_PAGE == 0 and not z.any()
    z[4, 2, 1] = 1.5
    assert z.sum() == 1.5 * 16 * 3 * 64
    assert huge_page_zeros((0, 4), torch.float32).shape == (0, 4)
    if THP.exists():
        assert "hg" in vm_flags(z.data_ptr())


@pytest.mark.skipif(not THP.exists(), reason="no transparent huge pages in this kernel")
def test_a_cpu_kv_cache_is_allocated_on_huge_pages():
    from engine.kv_cache import KVCache, KVCacheSpec

    cache = KVCache(KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=64, block_size=16,
                                dtype=torch.bfloat16), num_blocks=8)  # fmt: skip
    assert "hg" in vm_flags(cache.data.data_ptr()) and not cache.data.any()


def on_huge_pages(start: int, end: int) -> bool | None:
    """Whether every 4 KiB page of [start, end) lies in a transparent huge page (its frame's THP
    bit, through /proc/self/pagemap and /proc/kpageflags), None where the frame numbers are
    hidden (not root) or a page is not present."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // 4096 * 8)
        entries = f.read((end - start) // 4096 * 8)
    frames = []
    for i in range(0, len(entries), 8):
        entry = int.from_bytes(entries[i : i + 8], "little")
        frames.append(entry & ((1 << 55) - 1))
        if not entry >> 63 or frames[-1] == 0:  # not present, or frame numbers hidden
            return None
    with open("/proc/kpageflags", "rb") as f:
        flags = []
        for frame in frames:
            f.seek(frame * 8)
            flags.append(int.from_bytes(f.read(8), "little"))
    return all(flag >> 22 & 1 for flag in flags)  # KPF_THP


def test_memory_allocated_elsewhere_is_collapsed_in_place():
    """A torch tensor (malloc's memory, 4 KiB pages) keeps its address and values; on a kernel
    with MADV_COLLAPSE (6.1+) and THP not ``never`` every 2 MiB range wholly inside its 9 MiB
    (3 or 4, by where it starts) is on huge pages after the call, elsewhere nothing happens.
    (The ranges it shares with its neighbours collapse too where they lie wholly in the same
    mapping, so the count returned may be higher; a range already huge counts as done.)"""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 255, (9 << 20,), dtype=torch.uint8, generator=g)
    before, address = t.clone(), t.data_ptr()
    first, end = -(-address // HUGE_PAGE) * HUGE_PAGE, (address + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    whole = range(first, end, HUGE_PAGE)
    assert len(whole) in (3, 4)
    ranges = collapse_onto_huge_pages(address, t.nbytes)
    assert t.data_ptr() == address and torch.equal(t, before)
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if THP.exists() and "[never]" not in THP.read_text() and release >= (6, 1):
        assert ranges >= len(whole), ranges
        huge = [on_huge_pages(a, a + HUGE_PAGE) for a in whole]
        if None in huge:  # frame numbers hidden: the mapping's own count of huge-page memory
            assert anon_huge_kb(address) >= len(whole) * 2048
        else:
            assert all(huge), huge
    else:
        assert ranges == 0
    assert collapse_onto_huge_pages(address, 0) == 0
