"""Greedy picks on CPU (csrc/argmax.cpp) against ``torch.argmax(dim=-1)``: the first index of each
row's largest value, NaN counted as the largest, on fresh random rows and on rows built to hit
each rule (ties, NaN, infinities, signed zeros, lengths not a multiple of the vector width)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cpu_ext


def _rows(b: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 4


def _special(v: int, seed: int) -> torch.Tensor:
    """[8, v] (v >= 20): each row one rule."""
    x = _rows(8, v, seed)
    x[0, [3, v // 2, v - 1]] = 1e4  # a tie: the first wins
    x[1, [5, v - 2]] = float("nan")  # the first NaN, even below the max
    x[1, 0] = float("inf")
    x[2] = float("-inf")  # all -inf: index 0
    x[3, [7, v - 3]] = float("inf")
    x[4] = -1.0
    x[4, [9, 11]] = torch.tensor([-0.0, 0.0])  # -0.0 and 0.0 tie: the first
    x[5, v - 1] = 1e9  # the max in the scalar tail
    x[6, 17] = float("nan")
    x[6, 16] = float("inf")
    x[7] = 2.5  # all equal
    return x


@pytest.mark.parametrize(("b", "v"), [(1, 1), (1, 7), (3, 20), (5, 1001), (64, 49152)])
def test_cpu_argmax_equals_torch(b, v):
    ops = cpu_ext.load_ops()
    assert ops is not None, f"C++ extension did not build: {cpu_ext._failed}"
    seed = int(torch.randint(0, 1 << 30, ()).item())  # fresh rows every run
    cases = [_rows(b, v, seed), _rows(b, v + 13, seed + 1)[:, 5 : 5 + v]]  # contiguous, strided
    if v >= 20:
        cases.append(_special(v, seed + 2))
    for x in cases:
        assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1)), seed


def test_dispatch_takes_what_the_op_does_not():
    """``kernels.argmax_rows``: float32 rows to the op, anything else (other dtypes, a transposed
    view) to torch's argmax."""
    x = _rows(4, 100, 0)
    for other in (x, x.double(), x.bfloat16(), x.t()):
        assert torch.equal(kernels.argmax_rows(other), other.argmax(dim=-1))
