"""coordinator/launch.py builds the model's tokenizer in a child process
(``python -m engine.tokenizer_files``): the same files as in-process, a clear error naming the
source when it cannot, and nothing left behind when cancelled (the child killed and reaped)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import msgpack
import psutil
import pytest

from coordinator.launch import collect_tokenizer_files
from core.tokenizer import TokenizerFiles
from engine.tokenizer_files import load_tokenizer_files


def tokenizer_children() -> list[int]:
    """pids of this process's children running engine.tokenizer_files."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # gone, or a zombie: no command line
            if "engine.tokenizer_files" in child.cmdline():
                found.append(child.pid)
    return found


def test_child_builds_the_same_files() -> None:
    got = asyncio.run(collect_tokenizer_files("builtin:smollm2-135m-instruct"))
    assert got == load_tokenizer_files("builtin:smollm2-135m-instruct")
    assert tokenizer_children() == []


def test_a_source_it_cannot_load_is_named(tmp_path) -> None:
    missing = str(tmp_path / "nothing.gguf")
    with pytest.raises(RuntimeError, match="nothing.gguf") as err:
        asyncio.run(collect_tokenizer_files(missing))
    assert "GGUF file not found" in str(err.value)


def test_cancelled_it_kills_and_reaps_the_child() -> None:
    async def main() -> tuple[list[int], list[int]]:
        task = asyncio.create_task(collect_tokenizer_files("builtin:smollm2-135m-instruct"))
        deadline = time.monotonic() + 30
        while not (started := tokenizer_children()):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return started, tokenizer_children()

    started, left = asyncio.run(main())
    assert len(started) == 1 and left == []
    assert not psutil.pid_exists(started[0])  # not even a zombie: reaped


def test_what_the_libraries_print_stays_out_of_the_payload() -> None:
    code = (
        "import os, engine.tokenizer_files as t\n"
        "load = t.load_tokenizer_files\n"
        "def noisy(source):\n"
        "    print('from python')\n"
        "    os.write(1, b'from native code')\n"
        "    return load(source)\n"
        "t.load_tokenizer_files = noisy\n"
        "raise SystemExit(t.main(['builtin:smollm2-135m-instruct']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    files = TokenizerFiles.from_dict(msgpack.unpackb(res.stdout))
    assert files == load_tokenizer_files("builtin:smollm2-135m-instruct")
    assert b"from python" in res.stderr and b"from native code" in res.stderr
