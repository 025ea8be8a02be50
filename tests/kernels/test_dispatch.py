"""The dispatch table: CPU -> reference (or the C++ decode kernel), CUDA -> Triton, same
signatures, triton imported lazily."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from paged_cases import ROOT

import kernels
from kernels import reference


def test_import_kernels_does_not_import_triton():
    code = "import sys, kernels; print('triton' in sys.modules)"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert res.stdout.strip() == "False"


def _params(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter; annotations are spelled differently per module."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_cpu_resolves_to_reference(name):
    impl = kernels.resolve(name, "cpu")
    # decode attention: the C++ kernel, which itself falls back to the reference
    assert impl.__module__ in ("kernels.reference", "kernels.fused_reference", "kernels.cpu_ext")
    assert impl.__name__ == name


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_cuda_entry_is_a_triton_twin_with_the_reference_signature(name):
    triton_impl = kernels.resolve(name, "cuda")
    assert triton_impl.__module__.startswith("kernels.triton_")
    ref_params = _params(kernels.resolve(name, "cpu"))
    tri_params = _params(triton_impl)
    # the Triton wrapper takes the reference's parameters first, then keyword-only extras
    assert tri_params[: len(ref_params)] == ref_params
    assert all(
        kind is inspect.Parameter.KEYWORD_ONLY for _, kind, _ in tri_params[len(ref_params) :]
    )


def test_unknown_device_is_refused():
    with pytest.raises(NotImplementedError, match="meta"):
        kernels.resolve("decode_attention", "meta")


def test_dispatch_runs_the_reference_on_cpu():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 64, generator=gen)
    k, v = torch.randn(2, 6, 2, 64, generator=gen)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    got = kernels.prefill_attention(q, k, v, cu, 4, 0.125)
    assert torch.equal(got, reference.prefill_attention(q, k, v, cu, 4, 0.125))
