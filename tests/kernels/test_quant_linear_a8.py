"""Quantized linear layers with int8 activations (``model.quantize_activations``): the activation
quantizer, the references against a plain dequantized product, and the C++ kernel on repacked
weights (csrc/quant_linear_a8.cpp) against the references on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from a8_isa_check import special_rows
from isa_builds import check_build
from paged_cases import rel_err
from thread_split import same_on_two_threads

from kernels import cpu_ext, quant_reference

# The C++ kernel's integer block sums are exact; only its float32 scaling and summation order
# differ from the float64 references (bfloat16: plus the output's rounding, one ulp).
TOL = {torch.float32: 5e-6, torch.bfloat16: 8e-3}
FORMATS = ["int4", "int8-g32", "int8"]  # int8: per channel (one group of K)


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of mixed scale, a block of zeros and a block with an outlier (amax sets the step)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    if k > 32:
        x[0, :32] = 0
    if m > 1:
        x[1, k - 1] = 60.0
    return x.to(dtype)


def _w(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + torch.rand(n, 1, generator=g) * 0.02
    if fmt == "int4":
        return quant_reference.quantize_int4(w)
    return quant_reference.quantize_int8(w, 32 if fmt == "int8-g32" else None)


def _reference(fmt: str):
    return quant_reference.int4_linear_a8 if fmt == "int4" else quant_reference.int8_linear_a8


def test_activation_quantizer_rounds_each_block_to_its_own_step():
    x = _x(3, 96, torch.float32, seed=1)
    xq, dx = quant_reference.quantize_activations_int8(x)
    assert xq.dtype == torch.int8 and xq.shape == (3, 96) and dx.shape == (3, 3)
    assert dx[0, 0] == 0 and (xq[0, :32] == 0).all()  # an all-zero block
    step = dx.repeat_interleave(32, dim=1)
    assert ((xq.float() * step - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (xq.abs().amax(dim=1) == 127).all()  # each row's largest block uses the full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k"), [(1, 32), (3, 576), (70, 192)])
def test_cpu_quantizer_equals_the_reference_bit_for_bit(dtype, m, k):
    """``quantize_a8`` returns linear_a8's own int8 rows and steps (vectorised per ISA, rows
    split over threads): equal to ``quantize_activations_int8``, NaN steps included, on fresh
    random rows, ``a8_isa_check.special_rows``' blocks and a strided view (x.stride(0) > K)."""
    ops = cpu_ext.load_ops()
    seed = int(torch.randint(0, 1 << 30, ()).item())
    wide = _x(m, k + 64, dtype, seed)
    cases = [_x(m, k, dtype, seed + 1), wide[:, 32 : 32 + k]]
    if k >= 128:
        cases.append(special_rows(k, seed + 2).to(dtype))
    for x in cases:
        xq, dx = ops.quantize_a8(x)
        want_q, want_dx = quant_reference.quantize_activations_int8(x)
        assert torch.equal(xq, want_q), seed
        assert torch.equal(dx.isnan(), want_dx.isnan()), seed
        assert torch.equal(dx.nan_to_num(), want_dx.nan_to_num()), seed


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_is_the_product_of_the_dequantized_operands(fmt):
    x, w = _x(5, 160, torch.float32, seed=2), _w(fmt, 48, 160, seed=3)
    xq, dx = quant_reference.quantize_activations_int8(x)
    x_deq = xq.double() * dx.double().repeat_interleave(32, dim=1)
    dequantize = (
        quant_reference.dequantize_int4 if fmt == "int4" else quant_reference.dequantize_int8
    )
    want = x_deq @ dequantize(*w).double().t()
    got = _reference(fmt)(x, *w)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-6  # float64 math, rounded to float32 once


CASES = [  # (M, N, K): N a multiple of 16 (the kernel's row groups), K of 1-48 blocks
    (1, 16, 32),
    (1, 48, 576),
    (2, 32, 96),
    (3, 96, 576),
    (8, 64, 160),
    (11, 48, 1536),  # a tile of 8 rows, then 2, then 1
    (70, 32, 576),  # a 70-row decode step: 8 tiles of 8, then 4, then 2; rows quantized in parallel
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), CASES)
def test_cpu_kernel_matches_reference(fmt, dtype, m, n, k):
    ops = cpu_ext.load_ops()
    assert ops is not None, f"C++ extension did not build: {cpu_ext._failed}"
    seed = int(torch.randint(0, 1 << 30, ()).item())  # fresh inputs every run
    x, w = _x(m, k, dtype, seed), _w(fmt, n, k, seed + 1)
    out = ops.linear_a8(x, *cpu_ext.pack_a8(fmt[:4], w))
    ref = _reference(fmt)(x, *w)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < TOL[dtype], seed


@pytest.mark.parametrize("fmt", ["int4", "int8-g32"])
def test_cpu_kernel_is_batch_invariant(fmt):
    """A row's output does not depend on how many rows share the call (tiles of 8 / 4 / 2 / 1):
    speculative verification (k + 1 rows) reproduces plain decoding, while a step stays within
    the rows the engine gives this kernel (``engine.linear.A8_MAX_ROWS``)."""
    ops = cpu_ext.load_ops()
    x, w = _x(70, 192, torch.float32, seed=4), cpu_ext.pack_a8(fmt[:4], _w(fmt, 64, 192, seed=5))
    full = ops.linear_a8(x, *w)
    for m in (1, 2, 5, 9, 19, 64):
        assert torch.equal(ops.linear_a8(x[:m].contiguous(), *w), full[:m])
    assert torch.equal(ops.linear_a8(x[13:14].contiguous(), *w), full[13:14])


@pytest.mark.parametrize("fmt", ["int4", "int8-g32"])
def test_every_row_group_is_computed_once_whichever_thread_takes_it(fmt):
    """Two threads split the row groups, and one done early takes chunks from the back of the
    other's range (csrc/work_ranges.h): over many calls of two alternating inputs every output
    equals the one-thread result bit for bit (a group skipped would keep the other input's
    values, or garbage)."""
    ops = cpu_ext.load_ops()
    w = cpu_ext.pack_a8(fmt[:4], _w(fmt, 16 * 37, 576, seed=8))
    xs = [_x(m, 576, torch.bfloat16, seed=9 + m) for m in (1, 3)]
    same_on_two_threads(lambda x: ops.linear_a8(x, *w), xs)


def _cpu_has_amx_int8() -> bool:
    with open("/proc/cpuinfo") as f:
        return "amx_int8" in f.read()


@pytest.mark.parametrize("fmt", ["int4", "int8-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_path_equals_the_vnni_path_bit_for_bit(fmt, dtype):
    """On a CPU with AMX-INT8 (and Linux granting it) calls of 32+ rows take AMX for each block
    of 16 rows (tdpbsud), the rest the VNNI path: the integer sums are exact and the float part
    is the same code, so every row equals the row computed alone (VNNI), bit for bit, with the
    weight groups in both tile sets (odd and even blocks) and the leftover rows."""
    ops = cpu_ext.load_ops()
    if not _cpu_has_amx_int8():
        assert not ops.a8_uses_amx(64)
        pytest.skip("this CPU has no AMX-INT8: the VNNI path is tested above")
    assert ops.a8_uses_amx(32) and not ops.a8_uses_amx(31)
    seed = int(torch.randint(0, 1 << 30, ()).item())
    for m, n, k in ((32, 16, 32), (37, 96, 576), (64, 48, 1536)):  # 1 block; 18; 48
        x, w = _x(m, k, dtype, seed), _w(fmt, n, k, seed + 1)
        packed = cpu_ext.pack_a8(fmt[:4], w)
        full = ops.linear_a8(x, *packed)
        for i in range(m):
            alone = ops.linear_a8(x[i : i + 1].contiguous(), *packed)[0]
            assert torch.equal(alone, full[i]), (m, i, seed)
        assert rel_err(full, _reference(fmt)(x, *w)) < TOL[dtype], seed


@pytest.mark.parametrize("fmt", ["int4", "int8-g32"])
def test_non_finite_and_tiny_blocks(fmt):
    """A NaN or an inf in a block makes its row's outputs NaN, as in the reference (the integer
    cast of NaN is undefined); a block too small for 1 / dx to be finite counts as zeros."""
    ops = cpu_ext.load_ops()
    x = _x(4, 96, torch.float32, seed=8)
    x[0, 40], x[1, 70], x[2, :32] = float("nan"), float("inf"), 1e-38
    w = _w(fmt, 32, 96, seed=9)
    out, ref = ops.linear_a8(x, *cpu_ext.pack_a8(fmt[:4], w)), _reference(fmt)(x, *w)
    assert out[:2].isnan().all() and ref[:2].isnan().all()
    assert rel_err(out[2:], ref[2:]) < TOL[torch.float32]
    xq, dx = quant_reference.quantize_activations_int8(x)
    assert dx[2, 0] == 0 and (xq[2, :32] == 0).all() and (xq[:2] != 0).any()


def test_shapes_the_kernel_does_not_take():
    ops = cpu_ext.load_ops()
    w = _w("int4", 40, 64, seed=6)
    assert cpu_ext.pack_a8("int4", w) is None  # 40 rows: Linear takes the reference instead
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.int4_pack_a8(*w)
    assert cpu_ext.pack_a8("int8", _w("int8", 32, 48, seed=6)) is None  # a group of 48
    packed = cpu_ext.pack_a8("int4", _w("int4", 32, 64, seed=7))
    with pytest.raises(RuntimeError, match="from int4_pack_a8 / int8_pack_a8 for this x"):
        ops.linear_a8(torch.randn(1, 96), *packed)  # K does not match the weight


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    # the VNNI path alone (on a CPU with AMX the main build takes AMX from 32 rows), AVX2, plain
    ["-mno-amx-tile -mno-amx-int8", "-mno-avx512f", "-mno-avx2 -mno-fma -mno-avx512f"],
    ids=["vnni", "avx2", "plain"],
)
def test_the_paths_of_other_cpus_match_reference(flags, isa_build_dirs):
    """The extension is built for the CPU it runs on (-march=native), so the paths for CPUs
    without AMX (VNNI at every row count), without AVX512-VNNI (AVX2) or neither are built here
    with those features switched off, in a child process, and checked the same way (one build per
    flag set, shared with test_quant_linear.py's; skipped where the CPU lacks the feature anyway:
    the native build is that path)."""
    check_build("a8_isa_check.py", flags, isa_build_dirs)
