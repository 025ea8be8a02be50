"""C++ CPU kernels (JIT-built torch extension): paged decode attention, the KV store, fused
RMSNorm(+residual) / SiLU-mul / RoPE, weight-only int4 / int8 linears (int4 with bfloat16
activations on AVX512-BF16 too), the same with int8 activations, dense bfloat16 linears of decode
steps on the AMX tiles (on oneDNN's packed weight), and one whole decoder layer of a decode step
built from them (each file in csrc/ says why it exists).

Why: on CPU, ``kernels.reference.decode_attention`` gathers the paged KV cache into a padded float32
copy (``index_select``) and calls SDPA once per layer. The copy is most of its cost at large batch
(64 sequences x 200 tokens: ~75% of the call is ``index_select`` on the strided views) and ~25
small torch ops are most of it at batch 1 (~280 us). ``csrc/paged_decode.cpp`` reads each K/V row
once, straight from the strided paged cache, for all query heads of a KV head (GQA) and all
speculative queries of a sequence together, in one op call.

Measured (``python -m bench.kernels --cpu-decode``; SmolLM2 shapes 9 q / 3 kv heads, D=64,
16-token blocks, float32 strided layer views, random block tables, one query per sequence,
2 threads; reference -> extension per call): B=1 L=200: 272 -> 21 us (13x); B=8 L=200:
1.47 ms -> 66 us (22x); B=64 L=200: 10.5 -> 0.58 ms (18x); B=64 L=400: 21.6 -> 1.9 ms (11x).

The extension is built with ``torch.utils.cpp_extension.load`` on first use (``-O3
-march=native``: it runs where it is built) into the default torch extensions directory, then
cached for the process (and on disk across processes). If the build fails (no compiler, ...), one
warning names the error and every wrapper below uses its reference from then on. Inputs the
kernel does not handle (non-CPU tensors, non-contiguous head_dim, unsupported dtypes, FP8 without
scales) go to the reference too. Supported: float32 / bfloat16 / float16 / float8_e4m3fn caches
(with optional per-token-per-head float32 scales [num_blocks, block_size, Hkv]), q in float32 /
bfloat16 / float16; softmax and accumulation in float32.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from kernels import fused_reference, quant_reference, reference

logger = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """Short hash of this CPU's feature flags: a ``-march=native`` build is only valid on the CPU
    it was built for, and the extensions directory may be shared (an NFS home across nodes)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = platform.machine()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("paged_decode.cpp", "store_kv.cpp", "fused.cpp", "quant_linear.cpp",
           "quant_linear_a8.cpp", "quant_linear_bf16.cpp", "quant_linear_packed.cpp",
           "dense_linear.cpp", "dense_linear_f32.cpp",
           "decoder_layer.cpp", "team.cpp",
           "argmax.cpp")  # fmt: skip
# -ffp-contract=off: a * b + c stays two roundings, as in torch's separate ops (RoPE then equals
# the reference bit for bit); the hot loops that want FMA spell it with intrinsics.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]


def _sources_tag() -> str:
    """Short hash of csrc/ and the flags: each version of the sources gets a build (and a source
    copy, ``_stable_sources``) of its own, so two checkouts on one machine never mix files."""
    h = hashlib.sha1(" ".join(CFLAGS).encode())
    for src in sorted(CSRC.iterdir()):
        if src.suffix in (".cpp", ".h"):
            h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:8]


EXT_NAME = f"tandem_cpu_kernels_{_cpu_tag()}_{_sources_tag()}"

Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # also the caches stored without scales
CACHE_DTYPES = (*Q_DTYPES, torch.float8_e4m3fn)

_lock = threading.Lock()
_ops = None  # the torch.ops.tandem_cpu namespace once built
_failed: str | None = None  # the build error, once it failed


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH: put the pinned pip ``ninja`` first, in every
    process. It lives in the venv's bin, which is not on PATH when the venv is not activated
    (``.venv/bin/pytest``); and where another ninja is on PATH (Debian's ninja-build 1.11 at
    /usr/bin), two ninja versions hash the commands in ``.ninja_log`` differently, so each saw the
    other's build as "command line changed" and rebuilt the whole extension (seen in CI: ~70 s
    for a test's child process after Ray workers had built it)."""
    import ninja

    path = os.environ.get("PATH", "")
    if shutil.which("ninja") != os.path.join(ninja.BIN_DIR, "ninja"):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def _build_root() -> Path:
    """Where torch's loader builds extensions (TORCH_EXTENSIONS_DIR, else its default)."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


@contextmanager
def _builders_lock(build_dir: Path):
    """Held while torch's loader builds or loads ``build_dir``: an ``flock`` on a file beside it.

    Why: torch's loader makes processes take turns with a baton file (``build_dir/lock``) that a
    builder killed mid-build leaves behind; every later load then waited for it forever (seen
    here: a test run stopped during the build hung all that followed). The kernel releases an
    flock with the process that held it, so whoever holds ours knows no builder of ours is alive,
    and removes a baton it finds: a dead one's."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            baton = build_dir / "lock"
            if baton.exists():
                logger.warning(
                    "kernels.cpu_ext: removing %s, left by a build that was killed", baton
                )
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stable_sources() -> list[Path]:
    """csrc/ copied into a directory beside the builds named after this CPU and these sources
    (``EXT_NAME``), and the paths of the copies.

    Why: torch's loader runs ninja in every new process, and ninja rebuilds each object whose
    command line changed; the command names the source path, so every checkout or Ray job
    working-dir copy of the repo (a new path each time) recompiled all of it, and the next run
    from the old path did again: ~41 s each on 2 cores, against ~1.5 s to load a built one. A copy
    is rewritten only when its content differs (as after a process was killed mid-write), so its
    mtime tells ninja what to rebuild. Old versions' builds stay in the cache (a few MB each)."""
    dst = _build_root() / f"{EXT_NAME}_src"
    dst.mkdir(parents=True, exist_ok=True)
    for src in sorted(CSRC.iterdir()):
        if src.suffix not in (".cpp", ".h"):
            continue
        data, target = src.read_bytes(), dst / src.name
        if not target.exists() or target.read_bytes() != data:
            # another process may be compiling from dst (an NFS cache: maybe on another host)
            tmp = dst / f".{src.name}.{platform.node()}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return [dst / name for name in SOURCES]


def load_ops():
    """The compiled ops, ``torch.ops.tandem_cpu`` (building them on the first call), or None if
    the build failed."""
    global _ops, _failed
    if _ops is not None or _failed is not None:
        return _ops
    with _lock:
        if _ops is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load

                _put_ninja_on_path()
                with _builders_lock(_build_root() / EXT_NAME):
                    load(
                        name=EXT_NAME,
                        sources=[str(s) for s in _stable_sources()],
                        extra_cflags=CFLAGS,
                        extra_ldflags=["-fopenmp"],
                        is_python_module=False,
                        verbose=False,
                    )
                _ops = torch.ops.tandem_cpu
            except Exception as e:  # noqa: BLE001 - any build/load failure means: use the reference
                _failed = f"{type(e).__name__}: {e}".strip()[:2000]
                logger.warning(
                    "kernels.cpu_ext: building the C++ CPU kernels failed; using the torch "
                    "references from now on. Error: %s",
                    _failed,
                )
    return _ops


def supported(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None
) -> bool:
    """Whether the C++ kernel handles these inputs (the rest goes to the reference)."""
    if q.device.type != "cpu" or k_cache.device.type != "cpu" or v_cache.device.type != "cpu":
        return False
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return False
    if q.dtype not in Q_DTYPES or k_cache.dtype not in CACHE_DTYPES:
        return False
    if v_cache.dtype != k_cache.dtype:
        return False
    if q.shape[2] != k_cache.shape[3] or q.stride(2) != 1:
        return False
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        return False
    if (k_scale is None) != (v_scale is None):
        return False
    if k_scale is None:
        return k_cache.dtype != torch.float8_e4m3fn
    return all(
        s.device.type == "cpu" and s.dtype == torch.float32 and s.shape == k_cache.shape[:3]
        for s in (k_scale, v_scale)
    )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    cu_seqlens_q: Tensor,
    max_query_len: int,
    sm_scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """``kernels.reference.decode_attention`` (same arguments, same result) in one C++ call."""
    ops = load_ops() if supported(q, k_cache, v_cache, k_scale, v_scale) else None
    if ops is None:
        return reference.decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len, sm_scale,
            k_scale, v_scale,
        )  # fmt: skip
    return ops.decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, int(max_query_len),
        float(sm_scale), k_scale, v_scale,
    )  # fmt: skip


def store_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """``kernels.reference.store_kv`` in one C++ call (~3 us vs ~36 us per layer: the reference
    is eight small torch ops). FP8 caches (quantized on store) and dtype casts take the
    reference."""
    plain = (
        k_scale is None
        and key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.dtype in Q_DTYPES
        and key.dim() == 3
        and key.stride(2) == value.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
        and key.device.type == k_cache.device.type == "cpu"
    )
    ops = load_ops() if plain else None
    if ops is None:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        ops.store_kv(key, value, k_cache, v_cache, slot_mapping)


# ---- fused elementwise (csrc/fused.cpp): CPU float32 / bfloat16; the rest: fused_reference ----

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _rows(*xs: Tensor) -> bool:
    return all(
        x.device.type == "cpu" and x.dtype in _FUSED_DTYPES and x.dim() == 2 and x.stride(1) == 1
        for x in xs
    )


def argmax_rows(x: Tensor) -> Tensor:
    """``reference.argmax_rows`` with the rows over the threads and vectorised (csrc/argmax.cpp:
    torch's runs on one thread); float32 CPU rows, else the reference."""
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
    ops = load_ops() if usable and x.stride(1) == 1 and x.shape[1] > 0 else None
    return reference.argmax_rows(x) if ops is None else ops.argmax_rows(x)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``fused_reference.rms_norm`` in one pass (float32 / bfloat16 rows, weight of x's dtype)."""
    ops = load_ops() if _rows(x) and weight.dtype == x.dtype else None
    if ops is None:
        return fused_reference.rms_norm(x, weight, eps)
    return ops.rms_norm(x, weight.contiguous(), eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``fused_reference.add_rms_norm`` in one pass (float32 / bfloat16 rows)."""
    same = weight.dtype == residual.dtype == x.dtype
    ops = load_ops() if _rows(x, residual) and same else None
    if ops is None:
        return fused_reference.add_rms_norm(x, residual, weight, eps)
    return ops.add_rms_norm(x, residual, weight.contiguous(), eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``fused_reference.silu_mul`` in one pass (float32 / bfloat16 rows)."""
    ops = load_ops() if _rows(gate_up) else None
    return fused_reference.silu_mul(gate_up) if ops is None else ops.silu_mul(gate_up)


def rotary(
    q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """``fused_reference.rotary`` in one call (float32 / bfloat16 q/k, contiguous head_dim)."""
    plain = k.dtype == q.dtype and all(
        t.device.type == "cpu" and t.dtype in _FUSED_DTYPES and t.dim() == 3 and t.stride(2) == 1
        for t in (q, k)
    )
    ops = load_ops() if plain and cos.dtype == sin.dtype == torch.float32 else None
    if ops is None:
        return fused_reference.rotary(q, k, positions, cos, sin)
    return ops.rotary(q, k, positions, cos.contiguous(), sin.contiguous())


# ---- weight-only quantized linear (csrc/quant_linear.cpp): float32 / bfloat16 activations ----


def _quant_ok(x: Tensor, *ws: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.stride(1) == 1
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[1] % 32 == 0
        and all(w.device.type == "cpu" and w.is_contiguous() for w in ws)
    )


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """``quant_reference.int4_linear`` in one C++ call (x float32 / bfloat16)."""
    ops = load_ops() if _quant_ok(x, qweight, scales, mins) else None
    if ops is None:
        return quant_reference.int4_linear(x, qweight, scales, mins)
    return ops.int4_linear(x, qweight, scales, mins)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``quant_reference.int8_linear`` in one C++ call (x float32 / bfloat16, G % 32 == 0)."""
    ok = _quant_ok(x, qweight, scales) and (x.shape[1] // scales.shape[1]) % 32 == 0
    ops = load_ops() if ok else None
    if ops is None:
        return quant_reference.int8_linear(x, qweight, scales)
    return ops.int8_linear(x, qweight, scales)


def int4_dequantize(qweight: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype) -> Tensor:
    """``quant_reference.dequantize_int4`` cast to ``dtype`` (float32 / bfloat16), in C++."""
    ops = load_ops() if dtype in _FUSED_DTYPES and qweight.device.type == "cpu" else None
    if ops is None:
        return quant_reference.dequantize_int4(qweight, scales, mins).to(dtype)
    return ops.int4_dequantize(qweight, scales, mins, dtype)


def int8_dequantize(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """``quant_reference.dequantize_int8`` cast to ``dtype`` (float32 / bfloat16), in C++."""
    ops = load_ops() if dtype in _FUSED_DTYPES and qweight.device.type == "cpu" else None
    if ops is None:
        return quant_reference.dequantize_int8(qweight, scales).to(dtype)
    return ops.int8_dequantize(qweight, scales, dtype)


def pack_a8(fmt: str, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor] | None:
    """A quantized weight (``QuantizedWeight.tensors()`` of format ``fmt``, int4 or int8) repacked
    for ``linear_a8`` (csrc/quant_linear_a8.cpp: 16 output rows interleaved per block of 32
    inputs), or None: no extension, N not a multiple of 16, or an int8 group not of 32s."""
    qweight, scales = tensors[0], tensors[1]
    n, k = qweight.shape[0], qweight.shape[1] * (2 if fmt == "int4" else 1)
    fits = n % 16 == 0 and (k // scales.shape[1]) % 32 == 0
    ops = load_ops() if qweight.device.type == "cpu" and fits else None
    return None if ops is None else getattr(ops, f"{fmt}_pack_a8")(*tensors)


def pack_float(fmt: str, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor] | None:
    """``pack_a8``'s repacking for ``linear_packed`` (float activations). An int8 weight with one
    scale per row keeps one block's d and m per group of 16 rows ([N / 16, 1, 2, 16]), which the
    kernel reads once for all the blocks: not the ~12 % of the weight's bytes a d and m per block
    of 32 inputs would add."""
    packed = pack_a8(fmt, tensors)
    if packed is None or fmt != "int8" or tensors[1].shape[1] != 1:
        return packed
    return packed[0], packed[1][:, :1].contiguous()


# Activation dtypes each op takes without a check or a conversion (see ``direct``).
DIRECT_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "rms_norm": _FUSED_DTYPES,
    "add_rms_norm": _FUSED_DTYPES,
    "silu_mul": _FUSED_DTYPES,
    "rotary": _FUSED_DTYPES,
    "int4_linear": _FUSED_DTYPES,
    "int8_linear": _FUSED_DTYPES,
    "linear_a8": _FUSED_DTYPES,  # on pack_a8's weights: int8 activations
    "linear_packed": _FUSED_DTYPES,  # on pack_a8's weights: float activations (AVX-512 builds)
    "decode_attention": Q_DTYPES,
    "store_kv": Q_DTYPES,  # cache dtype == key dtype (no FP8: quantized on store by the reference)
    "dense_linear": (torch.bfloat16,),  # on a packed weight: oneDNN, or our kernels (128 rows)
}


def decoder_stack(dtype: torch.dtype):
    """``torch.classes.tandem_cpu.DecoderStack`` (csrc/decoder_layer.cpp: a decode step's layers
    in one call; engine/model.py) for ``dtype`` activations, or None (no extension, or a dtype it
    does not take)."""
    ops = load_ops() if dtype in _FUSED_DTYPES else None
    return None if ops is None else torch.classes.tandem_cpu.DecoderStack


def direct(name: str, dtype: torch.dtype):
    """The C++ op ``name`` itself for ``dtype`` activations, or None (no extension, or a dtype it
    does not take). For callers whose inputs always have the layouts the op takes (the engine's
    model: contiguous rows / head_dim, weights and caches of the model dtype): it skips the
    wrappers' per-call checks, ~2-5 us each over ~150 calls in a 30-layer decode step. The op
    still checks its inputs (and raises) rather than take anything else."""
    ops = load_ops() if dtype in DIRECT_DTYPES[name] else None
    return None if ops is None else getattr(ops, name)
