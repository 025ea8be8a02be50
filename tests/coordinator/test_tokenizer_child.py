"""coordinator/launch.py builds the model's tokenizer in a child process
(``python -m engine.tokenizer_files``): the same files as in-process, a clear error naming the
source when it cannot, and nothing left behind when cancelled (the child killed and reaped)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from coordinator.launch import collect_tokenizer_files
from core.tokenizer import TokenizerFiles
from engine.tokenizer_files import load_tokenizer_files


def tokenizer_children() -> list[int]:
    """pids of this process's children running engine.tokenizer_files."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and b"engine.tokenizer_files" in cmdline:
            found.append(int(entry.name))
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
    assert not Path(f"/proc/{started[0]}").exists()  # not even a zombie: reaped


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
