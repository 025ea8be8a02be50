"""Run one of the csrc build checks (a8_isa_check.py, quant_isa_check.py) in a child process:
it builds its sources with extra compiler flags (its ops would clash with the main extension's in
one process) and prints "ok" when every check against the reference passed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def check_build(script: str, flags: str, build_dir: Path) -> None:
    path = Path(__file__).with_name(script)
    res = subprocess.run([sys.executable, str(path), str(build_dir), flags],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
