"""The C++ CPU paged decode kernel (kernels.cpu_ext) against kernels.reference.decode_attention."""

from __future__ import annotations

import pytest
import torch
from paged_cases import cu_from_lens, random_block_tables, random_cache, rel_err

import kernels
from kernels import cpu_ext, reference
from kernels.reference import FP8_DTYPE

# float32: the same fp32 math in another order; bf16/fp16: one output rounding apart at most
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, FP8_DTYPE: 1e-5}


@pytest.fixture(scope="module")
def op():
    """The compiled op; the tests must exercise it, never the reference fallback."""
    built = cpu_ext.load_ops()
    assert built is not None, f"C++ extension did not build: {cpu_ext._failed}"
    return built.decode_attention


def _q_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if cache_dtype == FP8_DTYPE else cache_dtype


def _case(dtype, group, head_dim, seq_lens, n_q, seed, kv_heads=2, block_size=16):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5  # some blocks never referenced
    cache = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    q = torch.randn(sum(n_q), kv_heads * group, head_dim, generator=gen).to(_q_dtype(dtype))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (q, cache.k, cache.v, tables, lens, cu_from_lens(n_q), max(n_q), head_dim**-0.5,
            cache.k_scale, cache.v_scale)  # fmt: skip


def _run_both(args, op, monkeypatch):
    """(extension output, reference output); fails if the extension path was not taken."""
    calls = []
    monkeypatch.setattr(
        cpu_ext.reference, "decode_attention", lambda *a: calls.append(a) or 1 / 0, raising=True
    )
    q, kc, vc = args[:3]
    assert cpu_ext.supported(q, kc, vc, args[8], args[9])
    out = cpu_ext.decode_attention(*args)
    assert not calls, "cpu_ext fell back to the reference"
    monkeypatch.undo()
    return out, reference.decode_attention(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference(dtype, group, head_dim, op, monkeypatch):
    seq_lens = [1, 17, 40, 5, 16, 33, 70]  # ragged, incl. 1, multiples and non-multiples of 16
    n_q = [1, 3, 2, 1, 5, 4, 1]  # multi-query rows verify speculative tokens
    args = _case(dtype, group, head_dim, seq_lens, n_q, seed=group * 1000 + head_dim)
    out, ref = _run_both(args, op, monkeypatch)
    assert out.shape == ref.shape and out.dtype == ref.dtype == args[0].dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(seed, op, monkeypatch):
    """Random batch, lengths, query counts, block size, head_dim (not only the templated 64/128)."""
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(1, 9, (1,), generator=gen))
    n_q = torch.randint(1, 6, (batch,), generator=gen).tolist()
    seq_lens = [n + int(torch.randint(0, 90, (1,), generator=gen)) for n in n_q]
    head_dim = [64, 128, 80, 32][seed]
    args = _case(torch.float32, [1, 3, 4, 2][seed], head_dim, seq_lens, n_q, seed,
                 kv_heads=[1, 2, 3, 4][seed], block_size=[16, 8, 32, 16][seed])  # fmt: skip
    out, ref = _run_both(args, op, monkeypatch)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_strided_q_like_the_engine(op, monkeypatch):
    """q split off a [N, Hq + Hkv, D] tensor (the engine's layout): non-contiguous dims 0/1."""
    args = list(_case(torch.float32, 3, 64, [20, 7], [2, 1], seed=7))
    qk = torch.randn(3, 6 + 2, 64)
    args[0] = qk[:, :6]
    out, ref = _run_both(tuple(args), op, monkeypatch)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_unused_blocks_are_never_read(op, monkeypatch):
    """Blocks no sequence covers, and padding entries of block_tables beyond a sequence's blocks
    (0, garbage, -1), are never read: poisoned with NaN, the output stays finite and equal."""
    seq_lens, n_q = [5, 33, 16, 1], [1, 2, 3, 1]
    args = list(_case(torch.float32, 3, 64, seq_lens, n_q, seed=3))
    clean, ref = _run_both(tuple(args), op, monkeypatch)
    k_cache, v_cache, tables = args[1], args[2], args[3]
    used = {int(b) for row, n in zip(tables, seq_lens, strict=True) for b in row[: -(-n // 16)]}
    unused = [b for b in range(k_cache.shape[0]) if b not in used]
    assert unused
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    # garbage in the padding entries: an unused (poisoned) block, and -1 / huge ids
    padded = torch.full((len(seq_lens), tables.shape[1] + 2), unused[0], dtype=torch.int32)
    padded[:, : tables.shape[1]] = tables
    garbage = torch.tensor([unused[0], -1, 1 << 30, unused[-1]] * 4, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        nb = -(-n // 16)
        padded[b, nb:] = garbage[: padded.shape[1] - nb]
    args[3] = padded
    out = op(*args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
def test_long_sequences_in_several_chunks_match_the_reference(dtype, op, monkeypatch):
    """Sequences longer than a work chunk (512 keys) are split and their chunks merged: lengths
    just under, at and over one and two chunks, a long one beside short ones, several queries."""
    seq_lens = [1300, 5, 512, 513, 1030, 1024, 1]
    n_q = [1, 1, 3, 2, 5, 1, 1]
    args = _case(dtype, 3, 64, seq_lens, n_q, seed=21, kv_heads=3)
    out, ref = _run_both(args, op, monkeypatch)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, FP8_DTYPE])
def test_the_result_does_not_depend_on_the_thread_count(dtype, op):
    """A long sequence's chunks go to different threads; its merge is in chunk order, so one
    thread and two give the same bits."""
    args = _case(dtype, 3, 64, [1500, 700], [1, 3], seed=5, kv_heads=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*args)
        torch.set_num_threads(2)
        two = op(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("seq_len", [21, 40, 64, 133, 514, 1030])  # 514/1030: across a chunk's end
def test_a_verification_step_equals_the_decode_steps_it_replaces(dtype, seq_len, monkeypatch):
    """1 + k queries of one sequence (speculative verification: the last k keys are the queries'
    own) give each query, bit for bit, what a one-query decode step at its position gives: a
    score must not depend on how many keys follow it in its block or its chunk."""
    nq = 5
    q, kc, vc, tables, lens, _, _, scale, ks, vs = _case(dtype, 3, 64, [seq_len], [nq], seed=11)
    together = cpu_ext.decode_attention(q, kc, vc, tables, lens, cu_from_lens([nq]), nq, scale,
                                        ks, vs)  # fmt: skip
    for i in range(nq):  # query i sees the first seq_len - nq + 1 + i keys
        alone = cpu_ext.decode_attention(
            q[i : i + 1], kc, vc, tables, torch.tensor([seq_len - nq + 1 + i], dtype=torch.int32),
            cu_from_lens([1]), 1, scale, ks, vs,
        )  # fmt: skip
        assert torch.equal(together[i], alone[0]), f"query {i}"


def test_unsupported_inputs_fall_back_to_the_reference():
    """FP8 without scales, or a non-contiguous head_dim: the reference (which asserts/handles)."""
    gen = torch.Generator().manual_seed(0)
    cache = random_cache(4, 16, 2, 64, torch.float32, gen)
    q = torch.randn(2, 4, 64, generator=gen)
    strided_k = cache.k.transpose(2, 3).contiguous().transpose(2, 3)  # D not inner
    assert not cpu_ext.supported(q, strided_k, cache.v, None, None)
    assert not cpu_ext.supported(q, cache.k.to(FP8_DTYPE), cache.v.to(FP8_DTYPE), None, None)
    assert not cpu_ext.supported(q.double(), cache.k, cache.v, None, None)
    assert cpu_ext.supported(q, cache.k, cache.v, None, None)


def test_dispatch_uses_the_extension_on_cpu():
    assert kernels.resolve("decode_attention", "cpu") is cpu_ext.decode_attention


def test_build_failure_warns_once_and_falls_back(monkeypatch, caplog):
    """No compiler (or any build error): one warning naming it, then the reference, no crash."""
    import torch.utils.cpp_extension as cpp

    def broken_load(*args, **kwargs):
        raise RuntimeError("no c++ compiler here")

    monkeypatch.setattr(cpp, "load", broken_load)
    monkeypatch.setattr(cpu_ext, "_ops", None)
    monkeypatch.setattr(cpu_ext, "_failed", None)
    args = _case(torch.float32, 3, 64, [9, 20], [1, 2], seed=5)
    with caplog.at_level("WARNING", logger="kernels.cpu_ext"):
        first = cpu_ext.decode_attention(*args)
        second = cpu_ext.decode_attention(*args)
    warnings = [r for r in caplog.records if r.name == "kernels.cpu_ext"]
    assert len(warnings) == 1 and "no c++ compiler here" in warnings[0].getMessage()
    ref = reference.decode_attention(*args)
    assert torch.equal(first, ref) and torch.equal(second, ref)


def test_a_baton_left_by_a_killed_build_does_not_hang_the_next():
    """torch's loader waits on ``<build dir>/lock`` while another process builds; a builder
    killed mid-build leaves it behind. The next process (our flock held: no builder alive)
    removes it and loads, instead of waiting forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    assert cpu_ext.load_ops() is not None  # built here already: the child only loads it
    baton = cpu_ext._build_root() / cpu_ext.EXT_NAME / "lock"
    baton.touch()
    code = "from kernels import cpu_ext; assert cpu_ext.load_ops() is not None, cpu_ext._failed"
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "left by a build that was killed" in res.stderr and not baton.exists()


def test_every_process_builds_with_the_pinned_ninja(tmp_path, monkeypatch):
    """Another ninja first on PATH (Debian's 1.11) would hash the build's commands otherwise than
    the pinned one, and each would rebuild everything the other built."""
    import os
    import shutil

    import ninja

    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\nexit 1\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cpu_ext._put_ninja_on_path()
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    path = os.environ["PATH"]
    cpu_ext._put_ninja_on_path()
    assert os.environ["PATH"] == path  # once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_matches_the_reference(dtype):
    """Strided key/value views (as the engine's fused qkv output), a strided layer view of a
    block-major cache, padding slots (-1) skipped; every other cache byte untouched."""
    ops = cpu_ext.load_ops()
    assert ops is not None, f"C++ extension did not build: {cpu_ext._failed}"
    gen = torch.Generator().manual_seed(7)
    num_blocks, layers, block_size, kv_heads, head_dim, n = 9, 3, 16, 3, 64, 21
    cache = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim, generator=gen)
    cache = cache.to(dtype)
    qkv = torch.randn(n, (9 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    key = qkv[:, 9 * head_dim : (9 + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    value = qkv[:, (9 + kv_heads) * head_dim :].view(n, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[3, 11]] = -1
    expected = cache.clone()
    reference.store_kv(key, value, expected[:, 1, 0], expected[:, 1, 1], slots)
    ops.store_kv(key, value, cache[:, 1, 0], cache[:, 1, 1], slots)
    assert torch.equal(cache, expected)
    assert kernels.resolve("store_kv", "cpu") is cpu_ext.store_kv


def test_store_kv_rejects_out_of_range_slots():
    ops = cpu_ext.load_ops()
    cache = torch.zeros(2, 1, 2, 4, 1, 8)
    kv = torch.ones(1, 1, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.store_kv(kv, kv, cache[:, 0, 0], cache[:, 0, 1], torch.tensor([8]))
    assert not cache.any()


@pytest.mark.parametrize("rows", [1, 7, 300])  # one thread / a parallel split over rows
def test_fused_elementwise_match_the_references(rows):
    """C++ RMSNorm (+ residual), SiLU-mul and RoPE against kernels.fused_reference: RoPE bit for
    bit, the others to float32 rounding (another summation order; a polynomial exp)."""
    from kernels import fused_reference as ref

    ops = cpu_ext.load_ops()
    assert ops is not None, f"C++ extension did not build: {cpu_ext._failed}"
    gen = torch.Generator().manual_seed(rows)
    x = 3 * torch.randn(rows, 576, generator=gen)
    residual = torch.randn(rows, 576, generator=gen)
    w = torch.rand(576, generator=gen)
    assert rel_err(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)) < 2e-6
    out, h = ops.add_rms_norm(x, residual, w, 1e-5)
    ref_out, ref_h = ref.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(h, ref_h) and rel_err(out, ref_out) < 2e-6
    gate_up = 4 * torch.randn(rows, 2 * 1536, generator=gen)
    gate_up[0, :4] = torch.tensor([-200.0, -88.0, 0.0, 90.0])  # exp underflow / exact zero / large
    assert rel_err(ops.silu_mul(gate_up), ref.silu_mul(gate_up)) < 2e-6
    qkv = torch.randn(rows, 15 * 64, generator=gen)  # strided q and k views, as in the engine
    q, k = qkv[:, : 9 * 64].view(rows, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(rows, 3, 64)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    cos, sin = torch.rand(4096, 64, generator=gen), torch.rand(4096, 64, generator=gen)
    got, want = ops.rotary(q, k, positions, cos, sin), ref.rotary(q, k, positions, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name in ("rms_norm", "add_rms_norm", "silu_mul", "rotary"):
        assert kernels.resolve(name, "cpu") is getattr(cpu_ext, name)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fused_elementwise_bfloat16_round_where_the_references_round(rows):
    """bfloat16: float32 math rounded at the reference's points. The residual sum and RoPE are
    bit-identical; RMSNorm / SiLU may differ by one bf16 ulp where float32 rounding of the sum /
    the exp lands on the other side of a bf16 rounding boundary (rarely)."""
    from kernels import fused_reference as ref

    ops = cpu_ext.load_ops()
    assert ops is not None, f"C++ extension did not build: {cpu_ext._failed}"
    gen = torch.Generator().manual_seed(rows + 100)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # at most one bf16 ulp, on < 1 %
        ulp = b.float().abs() * 2**-7 + 1e-30
        off = (a.float() - b.float()).abs()
        return bool((off <= ulp).all()) and float((off > 0).float().mean()) < 0.01

    for width in (576, 579):  # 8 lanes at a time; a tail of 3 in the scalar loop
        x = (3 * torch.randn(rows, width, generator=gen)).bfloat16()
        residual = torch.randn(rows, width, generator=gen).bfloat16()
        w = (torch.rand(width, generator=gen) + 0.5).bfloat16()
        got = ops.rms_norm(x, w, 1e-5)
        assert got.dtype == torch.bfloat16 and close(got, ref.rms_norm(x, w, 1e-5))
        out, h = ops.add_rms_norm(x, residual, w, 1e-5)
        ref_out, ref_h = ref.add_rms_norm(x, residual, w, 1e-5)
        assert torch.equal(h, ref_h) and close(out, ref_out)
    for width in (1536, 1539):  # 8 lanes at a time; a tail of 3 in the scalar loop
        gate_up = (4 * torch.randn(rows, 2 * width, generator=gen)).bfloat16()
        gate_up[0, :4] = torch.tensor([-200.0, -88.0, 0.0, 90.0])  # exp underflow / zero / large
        assert close(ops.silu_mul(gate_up), ref.silu_mul(gate_up))
    for d in (64, 40):  # halves of 32: 8 lanes at a time; of 20: a tail of 4 per half
        qkv = torch.randn(rows, 15 * d, generator=gen).bfloat16()
        q, k = qkv[:, : 9 * d].view(rows, 9, d), qkv[:, 9 * d : 12 * d].view(rows, 3, d)
        positions = torch.randint(0, 4096, (rows,), generator=gen)
        cos, sin = torch.rand(4096, d, generator=gen), torch.rand(4096, d, generator=gen)
        got, want = ops.rotary(q, k, positions, cos, sin), ref.rotary(q, k, positions, cos, sin)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fused_elementwise_fall_back_for_mixed_dtypes_and_float16():
    from kernels import fused_reference as ref

    x = torch.randn(4, 64).bfloat16()
    w = torch.rand(64)  # float32 weight: the output promotes to float32, the reference's way
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    half = torch.randn(4, 64).half()
    assert torch.equal(kernels.silu_mul(half), ref.silu_mul(half))
