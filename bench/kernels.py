"""Kernel benchmark: every Triton kernel on CUDA at Llama-3-8B shapes (32 q / 8 kv heads, D=128).

    python -m bench.kernels                 # all kernels, bf16 (and an FP8 decode cache)
    python -m bench.kernels --only decode   # one kernel
    python -m bench.kernels --cpu-prefill   # CPU: the reference's padded-vs-loop prefill choice
    python -m bench.kernels --cpu-decode    # CPU: torch reference vs the C++ paged decode kernel

Prints achieved TFLOP/s (prefill: causal attention FLOPs, 4 * D per visible query-key pair per
head) and GB/s (decode, store_kv: bytes that must cross HBM at least once) next to the device's
peak, and torch SDPA on the same problem laid out densely (the best case for SDPA: no paging).
Peaks: a table of known parts (dense bf16 tensor-core TFLOP/s, HBM GB/s); otherwise measured with
a large bf16 matmul and a device-to-device copy (reported as "measured"). Without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3-8B attention, 16-token blocks
# name substring -> (dense bf16 TFLOP/s, memory GB/s), from vendor datasheets
KNOWN_PEAKS: dict[str, tuple[float, float]] = {  # first match wins: specific names first
    "H100 80GB HBM3": (989.0, 3350.0),  # SXM
    "H100 NVL": (835.0, 3900.0),
    "H100": (756.0, 2000.0),  # PCIe
    "H200": (989.0, 4800.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100 80GB PCIe": (312.0, 1935.0),
    "A100": (312.0, 1555.0),  # 40 GB parts
    "L40S": (362.0, 864.0),
    "L4": (121.0, 300.0),
    "A10G": (70.0, 600.0),
    "A10": (125.0, 600.0),
    "RTX 4090": (165.0, 1008.0),
    "RTX 3090": (71.0, 936.0),
}


def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def device_peaks() -> tuple[float, float, str]:
    name = torch.cuda.get_device_name()
    for key, (tflops, gbps) in KNOWN_PEAKS.items():
        if key in name:
            return tflops, gbps, f"{name} (datasheet)"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / bench_ms(lambda: a @ a) / 1e9
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6
    return tflops, gbps, f"{name} (measured: bf16 matmul, d2d copy)"


def paged_cache(num_blocks: int, dtype: torch.dtype, num_layers: int = 2):
    """Layer 1 of an engine-layout cache [blocks, layers, 2, block, H, D]: the strided views.
    Filled in place (no temporaries: the big cases use most of the device memory)."""
    shape = (num_blocks, num_layers, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    data = torch.empty(shape, device="cuda", dtype=dtype)
    if dtype == torch.float8_e4m3fn:
        data.view(torch.uint8).random_(0, 0x70)  # finite codes in (0, 128): no NaN patterns
        scales = torch.rand(shape[:-1], device="cuda") * 0.01 + 0.001
        return data[:, 1, 0], data[:, 1, 1], scales[:, 1, 0], scales[:, 1, 1]
    data.normal_()
    return data[:, 1, 0], data[:, 1, 1], None, None


def free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def prefill_case(batch: int, seqlen: int, ctx: int) -> tuple[float, float, float]:
    """(triton ms, sdpa ms, causal FLOPs) for B sequences of ``seqlen`` new tokens after ``ctx``
    cached ones. A function per case so its tensors are freed before the next one is built."""
    from kernels.triton_prefill import prefill_attention

    n = batch * seqlen
    q = torch.randn(n, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.arange(0, n + 1, seqlen, device="cuda", dtype=torch.int32)
    extra = {}
    if ctx:
        blocks_per_seq = ctx // BLOCK_SIZE
        kc, vc, _, _ = paged_cache(batch * blocks_per_seq, torch.bfloat16)
        perm = torch.randperm(batch * blocks_per_seq, device="cuda", dtype=torch.int32)
        extra = dict(
            k_cache=kc, v_cache=vc, block_tables=perm.view(batch, blocks_per_seq),
            context_lens=torch.full((batch,), ctx, device="cuda", dtype=torch.int32),
        )  # fmt: skip
    ms = bench_ms(partial(prefill_attention, q, k, v, cu, seqlen, HEAD_DIM**-0.5, **extra))
    # SDPA on the dense equivalent [B, H, S, D], the prefix laid out densely in front
    qd = q.view(batch, seqlen, Q_HEADS, HEAD_DIM).transpose(1, 2)
    kd = torch.randn(batch, KV_HEADS, ctx + seqlen, HEAD_DIM, device="cuda", dtype=q.dtype)
    vd = torch.randn_like(kd)
    mask = None
    if ctx:  # causal, aligned bottom-right: query j sees keys 0 .. ctx + j
        rows = torch.arange(seqlen, device="cuda")[:, None] + ctx
        mask = torch.arange(ctx + seqlen, device="cuda")[None, :] <= rows
    sdpa = partial(
        F.scaled_dot_product_attention, qd, kd, vd,
        attn_mask=mask, is_causal=mask is None, enable_gqa=True,
    )  # fmt: skip
    pairs = batch * (seqlen * (seqlen + 1) // 2 + seqlen * ctx)  # visible query-key pairs
    return ms, bench_ms(sdpa), 4 * HEAD_DIM * Q_HEADS * pairs


def run_prefill(peak_tflops: float) -> None:
    print(f"\nprefill (causal, varlen, bf16)   peak {peak_tflops:.0f} TFLOP/s")
    print(f"{'batch x len':>14} {'prefix':>7} {'triton ms':>10} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'sdpa ms':>8} {'sdpa TFLOP/s':>12}")  # fmt: skip
    cases = [(1, 1024, 0), (1, 4096, 0), (1, 16384, 0), (1, 32768, 0), (8, 2048, 0), (32, 512, 0)]
    cases += [(1, 2048, 8192), (4, 2048, 30720)]  # chunked prefill over a cached prefix
    for batch, seqlen, ctx in cases:
        ms, sdpa_ms, flops = prefill_case(batch, seqlen, ctx)
        torch.cuda.empty_cache()
        tflops = flops / ms / 1e9
        print(f"{batch:>5} x {seqlen:<6} {ctx:>7} {ms:>10.3f} {tflops:>8.1f} "
              f"{100 * tflops / peak_tflops:>5.1f}% {sdpa_ms:>8.3f} "
              f"{flops / sdpa_ms / 1e9:>12.1f}")  # fmt: skip


def decode_case(dtype: torch.dtype, batch: int, ctx: int) -> tuple[float, float, int, int]:
    """(triton ms, sdpa ms, paged bytes read, dense bytes read) for one decode step."""
    from kernels.triton_decode import decode_attention

    blocks_per_seq = ctx // BLOCK_SIZE
    kc, vc, ks, vs = paged_cache(batch * blocks_per_seq, dtype)
    perm = torch.randperm(batch * blocks_per_seq, device="cuda", dtype=torch.int32)
    tables = perm.view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(partial(decode_attention, q, kc, vc, tables, lens, cu, 1, 0.088, ks, vs))
    kv_elems = batch * ctx * KV_HEADS * HEAD_DIM * 2
    scale_bytes = 0 if ks is None else batch * ctx * KV_HEADS * 2 * 4
    moved = kv_elems * dtype.itemsize + scale_bytes + 2 * q.numel() * q.element_size()
    del kc, vc, ks, vs  # room for SDPA's dense bf16 copy
    kd = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=q.dtype)
    vd = torch.randn_like(kd)
    sdpa = partial(F.scaled_dot_product_attention, q[:, :, None], kd, vd, enable_gqa=True)
    return ms, bench_ms(sdpa), moved, kv_elems * 2


def run_decode(peak_gbps: float) -> None:
    print(f"\ndecode (paged, 1 query/seq, bf16 q)   peak {peak_gbps:.0f} GB/s; "
          "SDPA reads a dense bf16 cache (it has no paged or FP8 path)")  # fmt: skip
    print(f"{'kv dtype':>13} {'batch':>6} {'ctx':>6} {'triton ms':>10} {'GB/s':>7} {'%peak':>6} "
          f"{'sdpa ms':>8} {'sdpa GB/s':>9}")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for batch in (1, 16, 64, 256):
            for ctx in (1024, 4096, 16384, 32768):
                kv_elems = batch * ctx * KV_HEADS * HEAD_DIM * 2
                # the paged cache holds 2 layers (strided views) and is freed before SDPA's
                # dense bf16 copy is built; keep 1 GiB of headroom
                need = max(2 * kv_elems * dtype.itemsize, 2 * kv_elems)
                if need + (1 << 30) > free_bytes():
                    continue
                ms, sdpa_ms, moved, dense = decode_case(dtype, batch, ctx)
                torch.cuda.empty_cache()
                gbps = moved / ms / 1e6
                print(f"{str(dtype).split('.')[-1]:>13} {batch:>6} {ctx:>6} {ms:>10.3f} "
                      f"{gbps:>7.0f} {100 * gbps / peak_gbps:>5.1f}% {sdpa_ms:>8.3f} "
                      f"{dense / sdpa_ms / 1e6:>9.0f}")  # fmt: skip


def run_store_kv(peak_gbps: float) -> None:
    from kernels.triton_store_kv import store_kv

    print(f"\nstore_kv (reshape-and-cache)   peak {peak_gbps:.0f} GB/s")
    print(f"{'cache dtype':>12} {'tokens':>7} {'ms':>8} {'GB/s':>7} {'%peak':>6}")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for n in (256, 4096, 32768):
            num_blocks = 2 * n // BLOCK_SIZE
            kc, vc, ks, vs = paged_cache(num_blocks, dtype)
            key = torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            value = torch.randn_like(key)
            slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:n]
            ms = bench_ms(partial(store_kv, key, value, kc, vc, slots, ks, vs))
            written = 2 * key.numel() * dtype.itemsize + (0 if ks is None else 2 * n * KV_HEADS * 4)
            moved = 2 * key.numel() * key.element_size() + written + slots.numel() * 8
            gbps = moved / ms / 1e6
            print(f"{str(dtype).split('.')[-1]:>12} {n:>7} {ms:>8.3f} {gbps:>7.0f} "
                  f"{100 * gbps / peak_gbps:>5.1f}%")  # fmt: skip


def run_fused(peak_gbps: float) -> None:
    """Memory-bound fused kernels vs the torch expressions they replace (Llama-3-8B sizes)."""
    from kernels import fused_reference as ref
    from kernels import triton_fused as tri

    print(f"\nfused elementwise, bf16, 4096 tokens   peak {peak_gbps:.0f} GB/s")
    print(f"{'kernel':>13} {'triton ms':>10} {'GB/s':>7} {'%peak':>6} {'torch ms':>9}")
    n, hidden, inter = 4096, 4096, 14336
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, res = torch.randn(n, hidden, **bf16), torch.randn(n, hidden, **bf16)
    w = torch.rand(hidden, **bf16)
    gate_up = torch.randn(n, 2 * inter, **bf16)
    q = torch.randn(n, Q_HEADS, HEAD_DIM, **bf16)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, **bf16)
    pos = torch.randint(0, 8192, (n,), device="cuda")
    freqs = torch.rand(8192, HEAD_DIM // 2, device="cuda")
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    act = n * hidden * 2  # bytes of one [n, hidden] bf16 activation
    cases = [  # (name, triton, torch, bytes moved at minimum)
        ("rms_norm", partial(tri.rms_norm, x, w, 1e-5), partial(ref.rms_norm, x, w, 1e-5), 2 * act),
        ("add_rms_norm", partial(tri.add_rms_norm, x, res, w, 1e-5),
         partial(ref.add_rms_norm, x, res, w, 1e-5), 4 * act),
        ("silu_mul", partial(tri.silu_mul, gate_up), partial(ref.silu_mul, gate_up),
         3 * n * inter * 2),
        ("rotary", partial(tri.rotary, q, k, pos, cos, sin),
         partial(ref.rotary, q, k, pos, cos, sin), 2 * (q.numel() + k.numel()) * 2),
    ]  # fmt: skip
    for name, fast, slow, moved in cases:
        ms = bench_ms(fast)
        gbps = moved / ms / 1e6
        print(f"{name:>13} {ms:>10.3f} {gbps:>7.0f} {100 * gbps / peak_gbps:>5.1f}% "
              f"{bench_ms(slow):>9.3f}")  # fmt: skip


def run_cpu_prefill() -> None:
    """The measurement behind kernels.reference.PADDED_PREFILL_MAX_SEQLEN (SmolLM2 heads)."""
    from kernels import reference

    print(f"CPU prefill reference, 9 q / 3 kv heads, D=64, {torch.get_num_threads()} threads")
    print(f"{'batch x max len':>15} {'padded ms':>10} {'loop ms':>8}")
    gen = torch.Generator().manual_seed(0)
    for batch, seqlen in [(8, 16), (64, 16), (32, 64), (8, 128), (64, 128), (8, 512), (16, 512)]:
        # ragged: lengths uniform in [seqlen / 2, seqlen], as a prefill batch would be
        lens = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=gen)
        lens[0] = seqlen
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
        n = int(cu[-1])
        q, k, v = torch.randn(n, 9, 64), torch.randn(n, 3, 64), torch.randn(n, 3, 64)
        times = []
        for padded_max in (1 << 30, 0):  # force the padded batch, then the per-sequence loop
            fn = partial(
                reference.causal_varlen_attention, q, k, v, cu, seqlen, 0.125,
                padded_max_seqlen=padded_max,
            )  # fmt: skip
            fn()
            start, reps = time.perf_counter(), 0
            while time.perf_counter() - start < 0.5:
                fn()
                reps += 1
            times.append((time.perf_counter() - start) / reps * 1e3)
        print(f"{batch:>7} x {seqlen:<5} {times[0]:>10.2f} {times[1]:>8.2f}")


def run_cpu_decode(threads: int = 2) -> None:
    """kernels.reference vs kernels.cpu_ext decode attention, SmolLM2 shapes, one query per
    sequence, float32 strided layer views of a 2-layer cache, random block tables."""
    from kernels import cpu_ext, reference

    torch.set_num_threads(threads)
    if cpu_ext.load_ops() is None:
        print(f"bench.kernels: the C++ extension did not build: {cpu_ext._failed}")
        return
    q_heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    print(f"CPU decode attention, {q_heads} q / {kv_heads} kv heads, D={head_dim}, "
          f"block {block_size}, float32, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'batch x len':>12} {'reference us':>13} {'c++ us':>8} {'speedup':>8}")
    gen = torch.Generator().manual_seed(0)
    for batch, ctx in [(1, 200), (8, 200), (64, 200), (64, 400)]:
        blocks_per_seq = -(-ctx // block_size)
        num_blocks = batch * blocks_per_seq
        data = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, generator=gen)
        kc, vc = data[:, 1, 0], data[:, 1, 1]
        tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, -1)
        lens = torch.full((batch,), ctx, dtype=torch.int32)
        cu = torch.arange(batch + 1, dtype=torch.int32)
        q = torch.randn(batch, q_heads, head_dim, generator=gen)
        args = (q, kc, vc, tables, lens, cu, 1, head_dim**-0.5)
        times = []
        for fn in (reference.decode_attention, cpu_ext.decode_attention):
            fn(*args)
            start, reps = time.perf_counter(), 0
            while time.perf_counter() - start < 1.0:
                fn(*args)
                reps += 1
            times.append((time.perf_counter() - start) / reps * 1e6)
        print(f"{batch:>5} x {ctx:<4} {times[0]:>13.0f} {times[1]:>8.0f} "
              f"{times[0] / times[1]:>7.1f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["prefill", "decode", "store_kv", "fused"], default=None)
    parser.add_argument("--cpu-prefill", action="store_true", help="CPU reference strategies")
    parser.add_argument("--cpu-decode", action="store_true", help="CPU reference vs C++ decode")
    args = parser.parse_args(argv)
    if args.cpu_decode:
        run_cpu_decode()
        return 0
    if args.cpu_prefill:
        run_cpu_prefill()
        return 0
    if not torch.cuda.is_available():
        print("bench.kernels: no CUDA device here; the Triton kernels need a GPU. Nothing to do.")
        return 0
    tflops, gbps, source = device_peaks()
    print(f"device: {source}: {tflops:.0f} TFLOP/s bf16, {gbps:.0f} GB/s")
    if args.only in (None, "prefill"):
        run_prefill(tflops)
    if args.only in (None, "decode"):
        run_decode(gbps)
    if args.only in (None, "store_kv"):
        run_store_kv(gbps)
    if args.only in (None, "fused"):
        run_fused(gbps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
