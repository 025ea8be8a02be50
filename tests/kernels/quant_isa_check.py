"""Build csrc/quant_linear.cpp (with quant_linear_bf16.cpp, which it calls), quant_linear_packed.cpp
(with quant_linear_a8.cpp, whose repacking it runs on) and dense_linear.cpp with extra compiler
flags (a child process of test_quant_linear.py: its ops would clash with the main extension's in
one process) and check ``int4_linear`` / ``int8_linear`` against the reference on random inputs,
float32 and bfloat16, with batch invariance, ``linear_packed`` the same where the build runs it
(AVX-512; bfloat16 x of int4 with AVX512-BF16 only), ``dense_linear`` against oneDNN's own call (bit
for bit), and ``dense_linear_f32`` against ``dense_reference.lane_sums`` for each lane width the
build has (AVX2 + FMA: 8; AVX-512: 16 too; neither: none, and the op says so); prints "ok".

    python tests/kernels/quant_isa_check.py BUILD_DIR "-mno-avx512bf16"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from isa_builds import QUANT_SOURCES, build, cpu_flags  # noqa: E402

from kernels import dense_reference, quant_reference  # noqa: E402


def main(build_dir: str, flags: list[str]) -> None:
    build(build_dir, flags, QUANT_SOURCES)
    ops = torch.ops.tandem_cpu
    g = torch.Generator().manual_seed(0)
    for fmt in ("int4", "int8"):
        for m, n, k in ((1, 37, 96), (2, 24, 160), (4, 48, 576), (11, 48, 1536)):
            for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 8e-3)):
                x = (torch.randn(m, k, generator=g) * 3).to(dtype)
                w = torch.randn(n, k, generator=g) * 0.05
                wq = quant_reference.quantize_int4(w) if fmt == "int4" else \
                    quant_reference.quantize_int8(w, 32)  # fmt: skip
                op = getattr(ops, f"{fmt}_linear")
                out = op(x, *wq)
                ref = getattr(quant_reference, f"{fmt}_linear")(x, *wq)
                err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
                assert err < tol, (fmt, m, n, k, dtype, err)
                if m > 1:  # batch invariance
                    assert torch.equal(op(x[1:2].contiguous(), *wq)[0], out[1])
    avx512 = "-mno-avx512f" not in flags and {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()
    bf16_dot = avx512 and "-mno-avx512bf16" not in flags and "avx512_bf16" in cpu_flags()
    for fmt in ("int4", "int8"):
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 8e-3)):
            runs = avx512 and (bf16_dot or fmt == "int8" or dtype == torch.float32)
            bits = 4 if fmt == "int4" else 8
            assert ops.linear_packed_available(dtype, bits) == runs, (fmt, dtype, flags)
            if not runs:
                continue
            for m, n, k in ((1, 48, 96), (6, 32, 576)):
                x = (torch.randn(m, k, generator=g) * 3).to(dtype)
                w = torch.randn(n, k, generator=g) * 0.05
                wq = quant_reference.quantize_int4(w) if fmt == "int4" else \
                    quant_reference.quantize_int8(w)  # fmt: skip
                packed = getattr(ops, f"{fmt}_pack_a8")(*wq)
                out = ops.linear_packed(x, *packed)
                ref = getattr(quant_reference, f"{fmt}_linear")(x, *wq)
                err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
                assert err < tol, ("packed", fmt, m, n, k, dtype, err)
                if m > 1:  # batch invariance
                    assert torch.equal(ops.linear_packed(x[1:2].contiguous(), *packed)[0], out[1])
    for m, n, k in ((1, 64, 96), (5, 576, 576), (9, 96, 64)):
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, generator=g).bfloat16(), None)
        x = torch.randn(m, k, generator=g).bfloat16()
        ref = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        assert torch.equal(ops.dense_linear(x, w), ref), (m, n, k)
    lanes = list(ops.dense_linear_f32_lanes())
    want = [16] if "-mno-avx512f" not in flags and "avx512f" in cpu_flags() else []
    want += [] if "-mno-avx2" in flags else [8]
    assert lanes == want, (lanes, want)
    for lane in lanes:
        for m, n, k in ((1, 37, 96), (5, 48, 576)):
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05
            ref = dense_reference.lane_sums(x, w, lane)
            assert torch.equal(ops.dense_linear_f32(x, w, lane), ref), (lane, m, n, k)
    if not lanes:
        try:
            ops.dense_linear_f32(torch.randn(1, 32), torch.randn(4, 32))
            raise AssertionError("dense_linear_f32 ran without AVX2")
        except RuntimeError as e:
            assert "built without AVX2" in str(e), e
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split())
