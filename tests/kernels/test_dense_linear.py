"""csrc/dense_linear.cpp: x @ W^T on a weight packed by ``mkldnn::_reorder_linear_weight``, for
bfloat16 calls of up to 128 rows on oneDNN's own bytes with our AMX tiles or our vdpbf16ps
kernel, oneDNN otherwise."""

from __future__ import annotations

import pytest
import torch
from thread_split import same_on_two_threads

from engine.engine_config import cpu_has_amx
from engine.linear import onednn_packs
from kernels import cpu_ext

ops = cpu_ext.load_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ extension not built")

# SmolLM2's layer shapes (qkv, o, gate_up, down) and its LM head's K; a tiny Llama's
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (256, 64), (64, 96)]


def packed(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    return w, torch.ops.mkldnn._reorder_linear_weight(w, None)


def onednn(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")


def kernel_here() -> str:
    """Which kernel takes this CPU's bfloat16 calls of up to 128 rows: "amx" (AMX-BF16 granted,
    oneDNN packs 32-output blocks), "vdpbf16ps" (AVX512-BF16, oneDNN packs 32- or 64-output
    blocks) or "onednn"."""
    return ops.dense_linear_kernel(576, 576)


def pair_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The vdpbf16ps kernel's arithmetic in torch: per row and output a float32 sum over the
    k-pairs in order, the odd product then the even one added (each bfloat16 product is exact in
    float32), rounded to bfloat16 once."""
    xf, wf = x.float(), w.float()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for k in range(0, x.shape[1], 2):
        acc = acc + xf[:, k + 1, None] * wf[None, :, k + 1]
        acc = acc + xf[:, k, None] * wf[None, :, k]
    return acc.bfloat16()


def onednn_by_32(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """oneDNN's output computed 32 rows at a time (what our tiles give above 32 rows)."""
    return torch.cat([onednn(x[i : i + 32].contiguous(), p) for i in range(0, x.shape[0], 32)])


@pytest.mark.parametrize("n,k", SHAPES)
def test_outputs_equal_onednn_and_the_float64_product(n, k):
    """On our tiles (a CPU with AMX), every row count 1..32: bit for bit oneDNN's output on the
    same packed weight; 33..128 rows: oneDNN's output 32 rows at a time (oneDNN's own kernel
    above 32 rows rounds differently). On our vdpbf16ps kernel (AVX512-BF16 without AMX), 1..128
    rows: bit for bit ``pair_sums`` (oneDNN's own kernel sums in another order: a few outputs in
    10^5 differ by an ulp). Above 128 rows, and without either, oneDNN's call. Each output within
    one bfloat16 ulp of the float64 product of the same bfloat16 inputs plus the float32 sum's own
    error (which shows where the products nearly cancel)."""
    g = torch.Generator().manual_seed(n * 7 + k)
    w, p = packed(n, k, g)
    kernel = ops.dense_linear_kernel(n, k)
    for m in (1, 2, 3, 5, 8, 13, 16, 17, 24, 32, 33, 40, 64, 80, 97, 128, 129):
        x = torch.randn(m, k, generator=g).bfloat16()
        y = ops.dense_linear(x, p)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        ref = x.double() @ w.double().T
        # one ulp of the result: 2^(exponent - 7) for bfloat16's 8-bit significand
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
        sum_err = k * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
        assert ((y.double() - ref).abs() <= ulp + sum_err).all(), (n, k, m)
        if kernel == "vdpbf16ps" and m <= 128:
            expected = pair_sums(x, w)
        elif kernel == "amx" and 32 < m <= 128:
            expected = onednn_by_32(x, p)
        else:
            expected = onednn(x, p)
        assert torch.equal(y, expected), (n, k, m, kernel)


@pytest.mark.parametrize("n,k", SHAPES)
def test_rows_are_batch_invariant_up_to_128_rows(n, k):
    """A row's output does not depend on the other rows of a call of up to 128 (a verification
    step of k + 1 tokens per sequence then reproduces the decode steps it replaces), wherever it
    lies in the call: in a full 32-row chunk or in a last, zero-padded one."""
    if kernel_here() == "onednn":
        pytest.skip("neither our tiles nor our vdpbf16ps kernel runs on this CPU")
    g = torch.Generator().manual_seed(n + k)
    _, p = packed(n, k, g)
    x = torch.randn(128, k, generator=g).bfloat16()
    alone = torch.cat([ops.dense_linear(x[i : i + 1].contiguous(), p) for i in range(128)])
    for m in (*range(2, 34), 47, 64, 65, 80, 96, 101, 127, 128):
        assert torch.equal(ops.dense_linear(x[:m].contiguous(), p), alone[:m]), m
    wide = torch.randn(80, 2 * k, generator=g).bfloat16()  # rows with a stride, tail included
    assert torch.equal(
        ops.dense_linear(wide[:, :k], p), ops.dense_linear(wide[:, :k].contiguous(), p)
    )


def test_every_block_is_computed_once_whichever_thread_takes_it():
    """Our vdpbf16ps kernel's two threads claim blocks of outputs from per-thread ranges and take
    the other's when done (csrc/work_ranges.h): every output equals the one-thread result."""
    if kernel_here() != "vdpbf16ps":
        pytest.skip("our vdpbf16ps kernel does not run on this CPU")
    g = torch.Generator().manual_seed(4)
    _, p = packed(960, 576, g)
    xs = [torch.randn(m, 576, generator=g).bfloat16() for m in (1, 5)]
    same_on_two_threads(lambda x: ops.dense_linear(x, p), xs)


def test_the_layout_probe_and_the_fallbacks():
    """Shapes oneDNN pads (N or K not a multiple of its blocks), more than 128 rows, float16 and
    float32 weights take oneDNN's own call: bit for bit its output. The SmolLM2 and tiny-Llama
    shapes take our tiles on a CPU with AMX (granted), else our vdpbf16ps kernel on one with
    AVX512-BF16."""
    g = torch.Generator().manual_seed(3)
    assert ops.dense_linear_kernel(100, 64) == "onednn" == ops.dense_linear_kernel(64, 48)
    flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    expected = ("amx" if "amx_bf16" in flags and cpu_has_amx()
                else "vdpbf16ps" if "avx512_bf16" in flags else "onednn")  # fmt: skip
    assert {ops.dense_linear_kernel(n, k) for n, k in SHAPES} == {expected}
    for n, k, m, dtype in ((100, 64, 1, torch.bfloat16), (64, 48, 3, torch.bfloat16),
                           (576, 576, 129, torch.bfloat16), (576, 576, 300, torch.bfloat16),
                           (96, 64, 1, torch.float16), (96, 64, 2, torch.float32)):  # fmt: skip
        if not onednn_packs(dtype):  # float16 on a CPU without AVX512-FP16 (a Zen 4)
            continue
        w = torch.randn(n, k, generator=g).to(dtype)
        p = torch.ops.mkldnn._reorder_linear_weight(w, None)
        x = torch.randn(m, k, generator=g).to(dtype)
        assert torch.equal(ops.dense_linear(x, p), onednn(x, p)), (n, k, m, dtype)


def test_non_contiguous_rows_and_empty_calls():
    """x with a row stride (a view of a wider tensor) and x of 0 rows."""
    g = torch.Generator().manual_seed(5)
    w, p = packed(576, 576, g)
    wide = torch.randn(3, 1152, generator=g).bfloat16()
    x = wide[:, :576]
    assert torch.equal(ops.dense_linear(x, p), ops.dense_linear(x.contiguous(), p))
    assert ops.dense_linear(torch.empty(0, 576, dtype=torch.bfloat16), p).shape == (0, 576)
