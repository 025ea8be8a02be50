"""Weight-only quantized linear layers: quantizers (error bounds, layout), the C++ CPU kernel and
the Triton kernel (interpreter) against ``kernels.quant_reference`` on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from isa_builds import check_build, cpu_flags
from paged_cases import rel_err
from thread_split import same_on_two_threads

from kernels import cpu_ext, quant_reference, triton_quant_linear

# The kernels sum in another order than the float32 reference matmul: a few float32 ulps.
# bfloat16 activations: the kernels convert x exactly and round only the output (one ulp).
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05 + torch.rand(n, 1, generator=g) * 0.02


def test_int4_quantizer_error_is_half_a_step_and_nibbles_follow_q4_1():
    w = weights(8, 64, 0)
    q, d, m = quant_reference.quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (8, 32) and d.shape == m.shape == (8, 2)
    deq = quant_reference.dequantize_int4(q, d, m)
    step = d.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-3 * step + 2e-4).all()  # + float16 rounding of m
    # Q4_1 order: byte j of a group holds value j (low nibble) and value j + 16 (high nibble)
    levels = ((deq - m.float().repeat_interleave(32, 1)) / step).round().to(torch.uint8)
    assert torch.equal(q[:, :16], levels[:, :16] | (levels[:, 16:32] << 4))


@pytest.mark.parametrize("group", [None, 32])
def test_int8_quantizer_error_is_half_a_step(group):
    w = weights(8, 96, 1)
    q, s = quant_reference.quantize_int8(w, group)
    assert q.dtype == torch.int8 and s.shape == (8, 1 if group is None else 3)
    deq = quant_reference.dequantize_int8(q, s)
    step = s.float().repeat_interleave(96 // s.shape[1], dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert q.abs().max() == 127


CASES = [  # (M, N, K): decode and prefill-like M, N not a multiple of anything, K of 1-18 groups
    (1, 40, 64),
    (3, 96, 576),
    (9, 24, 96),
    (33, 48, 160),
    (1, 37, 96),  # batch 1 (rows in pairs) with an odd row left over
    (2, 24, 160),  # 5 groups: one 64-byte load of the bfloat16 path holds a lone group
    (5, 32, 1536),  # 48 groups: three chunks of 16 scales in that path; tiles of 4 and 1
]


def _inputs(fmt: str, m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = weights(n, k, seed + 1)
    if fmt == "int4":
        return x, quant_reference.quantize_int4(w), quant_reference.int4_linear
    group = 32 if fmt == "int8-g32" else None
    return x, quant_reference.quantize_int8(w, group), quant_reference.int8_linear


@pytest.mark.parametrize("fmt", ["int4", "int8", "int8-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), CASES)
def test_cpu_kernel_matches_reference(fmt, dtype, m, n, k):
    ops = cpu_ext.load_ops()
    assert ops is not None, f"C++ extension did not build: {cpu_ext._failed}"
    x, packed, ref_fn = _inputs(fmt, m, n, k, dtype, seed=m * 7 + k)
    op = ops.int4_linear if fmt == "int4" else ops.int8_linear
    out = op(x, *packed)
    ref = ref_fn(x, *packed)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < TOL[dtype]


def test_cpu_dispatch_takes_the_extension_and_falls_back_for_float16():
    import kernels

    assert kernels.resolve("int4_linear", "cpu") is cpu_ext.int4_linear
    x, packed, ref_fn = _inputs("int4", 2, 16, 64, torch.float16, seed=3)
    assert rel_err(cpu_ext.int4_linear(x, *packed), ref_fn(x, *packed)) == 0  # the reference


@pytest.mark.parametrize("fmt", ["int4", "int8", "int8-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), CASES[:3])
def test_triton_kernel_matches_reference(fmt, dtype, m, n, k):
    x, packed, ref_fn = _inputs(fmt, m, n, k, dtype, seed=m + k)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    fn = triton_quant_linear.int4_linear if fmt == "int4" else triton_quant_linear.int8_linear
    fn(x, *packed, out=out, block_n=16, block_k=32)
    ref = ref_fn(x, *packed)
    # bf16 under the interpreter: computed in float32 (triton_common.dot_dtype), output rounded
    assert rel_err(out, ref) < TOL[dtype] * 4


@pytest.mark.parametrize("fmt", ["int4", "int8", "int8-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dequantize_is_exact(fmt, dtype):
    """The whole-weight dequantization (steps too large for the quantized kernels): the
    reference's float32 weights bit for bit, rounded once to bfloat16."""
    assert cpu_ext.load_ops() is not None
    _, packed, _ = _inputs(fmt, 1, 72, 160, dtype, seed=9)
    if fmt == "int4":
        got = cpu_ext.int4_dequantize(*packed, dtype)
        want = quant_reference.dequantize_int4(*packed)
    else:
        got = cpu_ext.int8_dequantize(*packed, dtype)
        want = quant_reference.dequantize_int8(*packed)
    assert torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_cpu_kernel_is_batch_invariant(fmt):
    """A row's output does not depend on how many rows share the call (tiles of 16 / 8 / 4 / 2 /
    1, batch-1 row pairs): speculative verification (k + 1 rows) reproduces plain decoding."""
    ops = cpu_ext.load_ops()
    x, packed, _ = _inputs(fmt, 23, 38, 160, torch.float32, seed=4)
    op = ops.int4_linear if fmt == "int4" else ops.int8_linear
    full = op(x, *packed)
    for m in (1, 2, 5, 9):
        assert torch.equal(op(x[:m].contiguous(), *packed), full[:m])
    assert torch.equal(op(x[7:8].contiguous(), *packed), full[7:8])


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_is_computed_once_whichever_thread_takes_it(fmt, dtype):
    """Two threads split the weight rows (row pairs at 1 row), on the float path and, for
    bfloat16 x of int4, the vdpbf16ps one: every output equals the one-thread result, at 1 and 3
    rows, with an odd row count."""
    ops = cpu_ext.load_ops()
    op = ops.int4_linear if fmt == "int4" else ops.int8_linear
    _, packed, _ = _inputs(fmt, 1, 16 * 37 + 1, 576, dtype, seed=8)
    xs = [_inputs(fmt, m, 1, 576, dtype, seed=9 + m)[0] for m in (1, 3)]
    same_on_two_threads(lambda x: op(x, *packed), xs)


def test_int4_bfloat16_outputs_round_the_exact_product():
    """bfloat16 x of up to 8 rows on an AVX512-BF16 CPU takes csrc/quant_linear_bf16.cpp (16 d *
    sum((1 + q / 16) x) + (m - 16 d) * sum(x) per group), more rows the float path: either way
    each output is within one bfloat16 ulp of the float64 product of x and the dequantized weight,
    and nearly all are that product correctly rounded (measured: 99.8 % and more)."""
    g = torch.Generator().manual_seed(1)
    for m, n, k in ((1, 576, 1536), (1, 101, 160), (4, 960, 576), (7, 64, 576), (12, 64, 576)):
        x = (torch.randn(m, k, generator=g) * 2).bfloat16()
        packed = quant_reference.quantize_int4(weights(n, k, m))
        out = cpu_ext.load_ops().int4_linear(x, *packed)
        exact = (x.double() @ quant_reference.dequantize_int4(*packed).double().t()).bfloat16()
        ulps = (out.view(torch.int16).int() - exact.view(torch.int16).int()).abs()
        assert ulps.max() <= 1 and (ulps == 0).float().mean() >= 0.99, (m, n, k)


def test_int4_bfloat16_rows_are_batch_invariant_up_to_8_rows():
    """Calls of up to 8 bfloat16 rows (the bfloat16 path where it is built: one-row pairs, tiles
    of 4 / 2 / 1) give each row the bits it gets alone, so a batch-1 verification step reproduces
    the decode steps it replaces; larger calls (the float path) are batch-invariant among
    themselves. A one-row call's outputs do not depend on which weight rows share its pairs or
    threads either."""
    ops = cpu_ext.load_ops()
    x, packed, _ = _inputs("int4", 23, 37, 576, torch.bfloat16, seed=5)
    rows8 = ops.int4_linear(x[:8].contiguous(), *packed)
    for i in range(8):
        assert torch.equal(ops.int4_linear(x[i : i + 1].contiguous(), *packed)[0], rows8[i])
    for rows in (slice(0, 2), slice(1, 4), slice(2, 7), slice(3, 8)):
        assert torch.equal(ops.int4_linear(x[rows].contiguous(), *packed), rows8[rows])
    full = ops.int4_linear(x, *packed)
    for rows in (slice(0, 9), slice(3, 15), slice(7, 23)):
        assert torch.equal(ops.int4_linear(x[rows].contiguous(), *packed), full[rows])
    one = ops.int4_linear(x[:1].contiguous(), *packed)
    shifted = ops.int4_linear(x[:1].contiguous(), *(t[1:].contiguous() for t in packed))
    assert torch.equal(shifted[0], one[0, 1:])


PACKED = [("int4", torch.bfloat16), ("int4", torch.float32), ("int8", torch.bfloat16),
          ("int8", torch.float32)]  # fmt: skip


def _packed(fmt: str, n: int, k: int, seed: int):
    """A quantized weight (int4: Q4_1 tensors; int8: per channel) and its pack_a8 repacking."""
    w = weights(n, k, seed)
    q = quant_reference.quantize_int4(w) if fmt == "int4" else quant_reference.quantize_int8(w)
    return q, cpu_ext.pack_a8(fmt, q)


def _skip_unless_packed(fmt: str, dtype: torch.dtype):
    """The ops, or a skip where this build does not run x of ``dtype`` on ``fmt`` packed."""
    ops = cpu_ext.load_ops()
    if not ops.linear_packed_available(dtype, 4 if fmt == "int4" else 8):
        pytest.skip(f"this build has no linear_packed for {dtype} x of {fmt}")
    return ops


def test_packed_kernel_says_where_it_runs():
    """linear_packed runs float32 / bfloat16 x of int4 / int8 on an AVX-512 build, bfloat16 x of
    int4 (vdpbf16ps) only with AVX512-BF16, never float16 x."""
    ops = cpu_ext.load_ops()
    flags = cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    for fmt, dtype in PACKED:
        bf16_dot = fmt == "int4" and dtype == torch.bfloat16
        want = avx512 and ("avx512_bf16" in flags or not bf16_dot)
        assert ops.linear_packed_available(dtype, 4 if fmt == "int4" else 8) == want, (fmt, dtype)
    assert not ops.linear_packed_available(torch.float16, 4)


@pytest.mark.parametrize(("fmt", "dtype"), PACKED)
def test_packed_kernel_is_within_its_rounding_of_the_exact_product(fmt, dtype):
    """csrc/quant_linear_packed.cpp (16 rows in the lanes, s d * sum((1 + q / s) x) + (m - s d) *
    sum(x) per block) at 1-9 rows: each output within one ulp of its dtype of the float64 product
    of x and the dequantized weight, plus the float32 sums' own error over the factored terms
    (which shows where they nearly cancel); bfloat16 outputs nearly all that product correctly
    rounded, and for int4 (vdpbf16ps) nearly all equal to the row kernel's
    (quant_linear_bf16.cpp: the same arithmetic, summed in another order)."""
    ops = _skip_unless_packed(fmt, dtype)
    g = torch.Generator().manual_seed(2)
    s = 16.0 if fmt == "int4" else 256.0
    mant = 7 if dtype == torch.bfloat16 else 23
    for m, n, k in ((1, 576, 1536), (1, 96, 160), (4, 960, 576), (5, 64, 576), (9, 3072, 64)):
        x = (torch.randn(m, k, generator=g) * 2).to(dtype)
        q, packed = _packed(fmt, n, k, m + n)
        out = ops.linear_packed(x, *packed)
        assert out.shape == (m, n) and out.dtype == dtype
        if fmt == "int4":
            w, d, mins = quant_reference.dequantize_int4(*q).double(), q[1].double(), q[2].double()
        else:
            w, d = quant_reference.dequantize_int8(*q).double(), q[1].double()
            mins = -128 * d
        ref = x.double() @ w.t()
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - mant)
        # |s d (1 + q / s)| <= 2 s |d| and |m - s d| per weight, summed over k with |x|
        terms = (2 * s * d.abs() + (mins - s * d).abs()).repeat_interleave(k // d.shape[1], dim=1)
        sum_err = k * 2.0**-24 * (x.double().abs() @ (w.abs() + terms).t())
        assert ((out.double() - ref).abs() <= ulp + sum_err).all(), (m, n, k)
        if dtype == torch.bfloat16:
            assert (out == ref.bfloat16()).float().mean() >= 0.99, (m, n, k)
        if fmt == "int4" and dtype == torch.bfloat16:
            assert (out == ops.int4_linear(x, *q)).float().mean() >= 0.99, (m, n, k)
    # the engine passes the packed bytes viewed as int8 (that marks the kernel in DecoderStack)
    assert torch.equal(ops.linear_packed(x, packed[0].view(torch.int8), packed[1]), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int8_with_one_scale_per_row_reads_it_once_alike(dtype):
    """An int8 weight with one scale per row comes from ``pack_float`` with one block's d and m
    per group of 16 rows: the same bits as the full [N / 16, K / 32, 2, 16] dm, and a dm of one
    block refused where the weight is int4."""
    ops = _skip_unless_packed("int8", dtype)
    q, (packed, dm) = _packed("int8", 48, 576, seed=3)
    packed_f, dm_f = cpu_ext.pack_float("int8", q)
    assert torch.equal(packed_f, packed) and dm_f.shape == (3, 1, 2, 16)
    assert torch.equal(dm_f, dm[:, :1])
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert torch.equal(ops.linear_packed(x, packed_f, dm_f), ops.linear_packed(x, packed, dm))
    q4 = quant_reference.quantize_int4(weights(48, 576, 5))
    packed4, dm4 = cpu_ext.pack_float("int4", q4)
    assert dm4.shape == (3, 18, 2, 16)
    with pytest.raises(RuntimeError, match="dm must be"):
        ops.linear_packed(x.float(), packed4, dm4[:, :1].contiguous())


@pytest.mark.parametrize(("fmt", "dtype"), PACKED)
def test_packed_kernel_is_batch_and_thread_invariant(fmt, dtype):
    """Each row of a call of any size gets the bits it gets alone (tiles of 4 / 2 / 1 rows run
    the same operations), and two threads claiming row groups give the one-thread result."""
    ops = _skip_unless_packed(fmt, dtype)
    _, packed = _packed(fmt, 16 * 37, 576, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(19, 576, generator=g).to(dtype)
    alone = torch.cat([ops.linear_packed(x[i : i + 1].contiguous(), *packed) for i in range(19)])
    for rows in (slice(0, 2), slice(1, 4), slice(2, 7), slice(3, 11), slice(0, 19)):
        assert torch.equal(ops.linear_packed(x[rows].contiguous(), *packed), alone[rows])
    same_on_two_threads(
        lambda x: ops.linear_packed(x, *packed), [x[:1].contiguous(), x[:3].contiguous()]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    # AVX-512 without BF16 (bfloat16 x on the float path at every row count), AVX2, plain
    ["-mno-avx512bf16", "-mno-avx512f", "-mno-avx2 -mno-fma -mno-avx512f"],
    ids=["no-bf16", "avx2", "plain"],
)
def test_the_paths_of_other_cpus_match_reference(flags, isa_build_dirs):
    """The extension is built for the CPU it runs on (-march=native), so the paths for CPUs
    without AVX512-BF16, without AVX-512 or without AVX2 are built here with those features
    switched off, in a child process, and checked against the reference (skipped where the CPU
    lacks the feature anyway: the native build is that path)."""
    check_build("quant_isa_check.py", flags, isa_build_dirs)
