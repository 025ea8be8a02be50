"""Shared test setup. TRITON_INTERPRET must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session):
    """Build the C++ CPU kernels once, up front: otherwise the first worker actor to start (under
    a readiness timeout) would pay the ~30 s compile on a fresh machine."""
    from kernels import cpu_ext

    if cpu_ext.load_ops() is None:
        raise RuntimeError(f"the C++ CPU kernels did not build: {cpu_ext._failed}")
