"""Fixtures for the kernel tests.

This folder is named like the ``kernels`` package it tests; without an ``__init__.py`` it is a
namespace-package candidate for ``import kernels`` whenever ``tests/`` is on sys.path (pytest's
prepend import mode puts it there). A regular package wins over a namespace portion only if its
parent directory is on sys.path too, so make sure the repository root is, whichever way pytest
was started (``pytest`` does not add the working directory, ``python -m pytest`` does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if getattr(sys.modules.get("kernels"), "__file__", "") is None:  # a namespace stand-in
    del sys.modules["kernels"]


@pytest.fixture(scope="session")
def isa_build_dirs(tmp_path_factory) -> dict[str, Path]:
    """One build directory per compiler flag set, shared by the session's ISA build checks
    (isa_builds.py)."""

    class Dirs(dict):
        def __missing__(self, flags: str) -> Path:
            self[flags] = tmp_path_factory.mktemp("isa-build")
            return self[flags]

    return Dirs()
