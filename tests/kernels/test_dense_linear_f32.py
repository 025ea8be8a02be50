"""csrc/dense_linear_f32.cpp: float32 x @ W^T on the plain weight for a decode step's few rows,
AVX-512 (16 lanes) or AVX2 (8 lanes) FMAs; engine.linear.linear sends it up to
F32_DIRECT_MAX_ROWS rows. The builds of CPUs without AVX-512 / AVX2: quant_isa_check.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from thread_split import same_on_two_threads

from engine import linear as engine_linear
from kernels import cpu_ext
from kernels.dense_reference import fma, lane_sums

ops = cpu_ext.load_ops()
LANES = [] if ops is None else list(ops.dense_linear_f32_lanes())
pytestmark = pytest.mark.skipif(not LANES, reason="C++ extension not built with AVX2 + FMA")

# SmolLM2's layer shapes (qkv, o, gate_up, down); N not a multiple of the 4 rows an item takes;
# every K a multiple of 16 lanes
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (50, 64), (7, 32)]


def test_the_reference_fma_rounds_once():
    """acc = 1 + 2^-23, a * b = 2^-24 - 2^-70: the exact sum lies just below 1 + 3 * 2^-24, halfway
    between two float32 values, so one rounding gives 1 + 2^-23; the float64 sum is that halfway
    point itself (so is a float32 product's sum), which ties to even: 1 + 2^-22."""
    acc = torch.tensor([1 + 2.0**-23])
    a, b = torch.tensor([2.0**-24 * (1 + 2.0**-23)]), torch.tensor([1 - 2.0**-23])
    assert fma(acc, a, b).item() == 1 + 2.0**-23
    assert (acc.double() + a.double() * b.double()).float().item() == 1 + 2.0**-22
    assert (acc + a * b).item() == 1 + 2.0**-22
    one = torch.tensor([1.0])
    assert fma(one, torch.tensor([2.0**-24]), one).item() == 1.0  # an exact tie stays a tie


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_outputs_equal_the_reference_bit_for_bit(n, k, lanes):
    """Fresh random inputs, 1..6 and 16 rows: every output equals ``lane_sums`` bit for bit,
    and lies within the float32 sum's error of the float64 product."""
    w = torch.randn(n, k) * 0.05
    for m in (1, 2, 3, 4, 5, 6, 16):
        x = torch.randn(m, k)
        y = ops.dense_linear_f32(x, w, lanes)
        assert torch.equal(y, lane_sums(x, w, lanes)), (m, lanes)
        exact = x.double() @ w.double().T
        bound = (k // lanes + 4) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
        assert ((y.double() - exact).abs() <= bound).all()


def test_rows_do_not_depend_on_the_rows_beside_them():
    """Each row of a 16-row call equals that row alone, and rows 3..9 of it taken as a strided
    view (the engine's verification steps against its decode steps)."""
    w = torch.randn(960, 576) * 0.05
    x = torch.randn(16, 576)
    y = ops.dense_linear_f32(x, w)
    for i in range(16):
        assert torch.equal(ops.dense_linear_f32(x[i : i + 1], w), y[i : i + 1]), i
    wide = torch.randn(16, 600)
    wide[:, 7 : 7 + 576] = x
    assert torch.equal(ops.dense_linear_f32(wide[3:10, 7 : 7 + 576], w), y[3:10])


def test_two_threads_give_the_one_thread_outputs():
    w = torch.randn(3072, 576) * 0.05
    xs = [torch.randn(1, 576), torch.randn(5, 576)]
    same_on_two_threads(lambda x: ops.dense_linear_f32(x, w), xs)


def test_bad_inputs_are_named_and_empty_ones_work():
    with pytest.raises(RuntimeError, match="K = 36 is not a multiple of"):
        ops.dense_linear_f32(torch.randn(1, 36), torch.randn(8, 36), LANES[-1])
    assert torch.equal(
        ops.dense_linear_f32(torch.randn(2, 0), torch.randn(3, 0)), torch.zeros(2, 3)
    )
    assert ops.dense_linear_f32(torch.randn(0, 16), torch.randn(3, 16)).shape == (0, 3)
    with pytest.raises(RuntimeError, match="lanes 4 not built"):
        ops.dense_linear_f32(torch.randn(1, 64), torch.randn(8, 64), 4)
    with pytest.raises(RuntimeError, match="float32"):
        ops.dense_linear_f32(torch.randn(1, 64).bfloat16(), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="for this x"):
        ops.dense_linear_f32(torch.randn(1, 64), torch.randn(8, 32))


def test_the_engine_takes_it_up_to_its_row_limit_and_mkl_above(monkeypatch):
    """engine.linear.linear: up to F32_DIRECT_MAX_ROWS rows this kernel (widest lanes), above it,
    where K is not a multiple of the lanes and where the kernel is not built (no AVX2) MKL's (bit
    for bit ``F.linear``)."""
    w = torch.randn(576, 576) * 0.05
    limit = engine_linear.F32_DIRECT_MAX_ROWS
    for m in (1, limit):
        x = torch.randn(2, m, 576)[1]  # a view into a larger tensor
        assert torch.equal(engine_linear.linear(x, w), ops.dense_linear_f32(x.contiguous(), w))
    x = torch.randn(limit + 1, 576)
    assert torch.equal(engine_linear.linear(x, w), F.linear(x, w))
    odd = torch.randn(64, LANES[-1] * 3 + 4)
    x = torch.randn(1, odd.shape[1])
    assert torch.equal(engine_linear.linear(x, odd), F.linear(x, odd))
    monkeypatch.setattr(engine_linear, "f32_direct_lanes", lambda: 0)
    x = torch.randn(1, 576)
    assert torch.equal(engine_linear.linear(x, w), F.linear(x, w))
