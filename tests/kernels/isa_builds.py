"""Run one of the csrc build checks (a8_isa_check.py, quant_isa_check.py) in a child process: it
builds the linear kernels' sources with extra compiler flags (their ops would clash with the main
extension's in one process) and prints "ok" when every check against the reference passed.

Each build goes to one directory per flag set (the ``isa_build_dirs`` fixture). For the flag sets
both checks use (SHARED_FLAGS) each builds every source they need (ISA_SOURCES), so the second
finds the build done: two ninja jobs compile the files at once, nothing twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# quant_linear_packed.cpp runs on quant_linear_a8.cpp's repacking (int4_pack_a8 / int8_pack_a8)
QUANT_SOURCES = ("quant_linear.cpp", "quant_linear_bf16.cpp", "dense_linear.cpp",
                 "dense_linear_f32.cpp", "quant_linear_packed.cpp",
                 "quant_linear_a8.cpp")  # fmt: skip
A8_SOURCES = ("quant_linear_a8.cpp",)
ISA_SOURCES = tuple(dict.fromkeys((*QUANT_SOURCES, *A8_SOURCES)))
SHARED_FLAGS = ("-mno-avx512f", "-mno-avx2 -mno-fma -mno-avx512f")  # AVX2, plain

# a flag set that switches off only features this CPU lacks builds what the main (-march=native)
# extension already is, which the other kernel tests check
NATIVE_UNLESS = {"-mno-avx512bf16": "avx512_bf16", "-mno-amx-tile -mno-amx-int8": "amx_int8"}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())


def check_build(script: str, flags: str, build_dirs: dict[str, Path]) -> None:
    feature = NATIVE_UNLESS.get(flags)
    if feature is not None and feature not in cpu_flags():
        pytest.skip(f"this CPU has no {feature}: the main build is this path, tested above")
    path = Path(__file__).with_name(script)
    res = subprocess.run([sys.executable, str(path), str(build_dirs[flags]), flags],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def build(build_dir: str, flags: list[str], own: tuple[str, ...]) -> None:
    """A check's own sources (all of ISA_SOURCES for SHARED_FLAGS) built with flags into
    build_dir and loaded (in the child process)."""
    from torch.utils.cpp_extension import load

    from kernels import cpu_ext

    cpu_ext._put_ninja_on_path()
    names = ISA_SOURCES if " ".join(flags) in SHARED_FLAGS else own
    # team.cpp: the kernels' parallel loops (team.h)
    sources = [str(cpu_ext.CSRC / name) for name in (*names, "team.cpp")]
    load(name="tandem_isa_check", sources=sources, extra_cflags=[*cpu_ext.CFLAGS, *flags],
         extra_ldflags=["-fopenmp"], build_directory=build_dir, is_python_module=False)  # fmt: skip
