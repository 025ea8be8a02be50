"""Build csrc/quant_linear_a8.cpp (with quant_isa_check.py's sources for the flags it builds
too) with extra compiler flags (a child process of test_quant_linear_a8.py: its ops would clash
with the main extension's in one process) and check ``linear_a8`` against the references on
random inputs; prints "ok".

    python tests/kernels/a8_isa_check.py BUILD_DIR "-mno-avx512f"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from isa_builds import A8_SOURCES, build  # noqa: E402

from kernels import quant_reference  # noqa: E402


def special_rows(k: int, seed: int) -> torch.Tensor:
    """Float32 rows [6, k] (k >= 128) whose blocks hit each rule of the activation quantizer:
    exact ties (amax 127, so dx = 1 and x / dx = x: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0), a zero
    block, -0.0, a NaN, -inf and +inf, a block too small for 1 / dx and denormals; the rest random.
    (test_quant_linear_a8.py uses them too.)"""
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(seed)) * 4
    x[0, :8] = torch.tensor([127.0, 2.5, 3.5, -0.5, -2.5, 0.5, 1.5, -127.0])
    x[1, :32], x[1, 32:64] = 0.0, -0.0
    x[2, 40], x[3, 70], x[3, 100] = float("nan"), float("-inf"), float("inf")
    x[4, :32], x[4, 32:64] = 1e-38, 3e-39  # 1 / dx overflows: zeros
    x[5, 96:128] = torch.linspace(-1e-35, 1e-35, 32)
    return x


def main(build_dir: str, flags: list[str]) -> None:
    build(build_dir, flags, A8_SOURCES)
    ops = torch.ops.tandem_cpu
    g = torch.Generator().manual_seed(0)
    for fmt in ("int4", "int8"):
        for m, n, k in ((1, 16, 32), (1, 48, 576), (3, 96, 576), (11, 48, 1536), (70, 32, 576)):
            for dtype, tol in ((torch.float32, 5e-6), (torch.bfloat16, 8e-3)):
                x = (torch.randn(m, k, generator=g) * 3).to(dtype)
                w = torch.randn(n, k, generator=g) * 0.05
                wq = quant_reference.quantize_int4(w) if fmt == "int4" else \
                    quant_reference.quantize_int8(w, 32)  # fmt: skip
                packed = getattr(ops, f"{fmt}_pack_a8")(*wq)
                out = ops.linear_a8(x, *packed)
                ref = getattr(quant_reference, f"{fmt}_linear_a8")(x, *wq)
                err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
                assert err < tol, (fmt, m, n, k, dtype, err)
                if m > 1:  # batch invariance
                    assert torch.equal(ops.linear_a8(x[1:2].contiguous(), *packed)[0], out[1])
    for dtype in (torch.float32, torch.bfloat16):  # the quantizer alone, bit for bit
        x = torch.cat([torch.randn(64, 192, generator=g) * 3, special_rows(192, 0)])  # 70 rows
        for rows in (x, torch.cat([x, x], 1)[:, 16:208]):  # contiguous and strided
            xq, dx = ops.quantize_a8(rows.to(dtype))
            want_q, want_dx = quant_reference.quantize_activations_int8(rows.to(dtype))
            assert torch.equal(xq, want_q), dtype
            assert torch.equal(dx.nan_to_num(), want_dx.nan_to_num()), dtype
            assert torch.equal(dx.isnan(), want_dx.isnan()), dtype
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split())
