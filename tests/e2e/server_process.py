"""Run ``tandem serve`` (or any command that prints the serving URL) as a real subprocess.

The process gets its own session, so a hung server can be killed as one group without touching
anything else on the machine. ``stop()`` sends SIGINT, as a user at a terminal would, and reports
how the process ended; the fixture that owns it asserts a clean exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"Tandem: serving \S+ at (http://\S+)")
WORKER_LINE = re.compile(r"tandem worker (\S+) ready in pid (\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.update(
        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false"
    )
    # Ray folds worker log lines that differ only in words with digits ("decode-0" vs
    # "prefill-0"); the tests read every worker's "ready in pid" line.
    env["RAY_DEDUP_LOGS"] = "0"
    # the venv's python first: Ray starts its workers (and job entrypoints) with this PATH
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=server_env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.url: str | None = None
        self.worker_pids: dict[str, int] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if (m := WORKER_LINE.search(line)) is not None:
                self.worker_pids[m.group(1)] = int(m.group(2))
            if self.url is None and (m := URL_LINE.search(line)) is not None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process ended: wake a waiter

    def new_pid(self, name: str, old: int, timeout_s: float = 20.0) -> int:
        """``name``'s pid once a new incarnation's ready line has been read: Ray forwards a
        worker's output with a lag, so the line can come after the coordinator counted the
        restart."""
        deadline = time.monotonic() + timeout_s
        while self.worker_pids.get(name) == old:
            assert time.monotonic() < deadline, f"no new incarnation of {name} (pid {old})"
            time.sleep(0.1)
        return self.worker_pids[name]

    def wait_ready(self, timeout_s: float) -> str:
        if not self._ready.wait(timeout_s) or self.url is None:
            self.kill()
            raise RuntimeError(f"server not ready; log:\n{self.tail()}")
        return self.url

    def tail(self, num_lines: int = 60) -> str:
        return "".join(self.log_path.read_text().splitlines(keepends=True)[-num_lines:])

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 60.0) -> tuple[int | None, list[int]]:
        """SIGINT, wait; returns (exit code or None if it had to be killed, pids left over)."""
        children = self.descendants()
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            code = self.proc.returncode
        deadline = time.monotonic() + 15
        left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in left:  # only our own server's leftovers, by pid
            p.kill()
        self._reader.join(5)
        self._log.close()
        return code, [p.pid for p in left]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_tandem(
    config: str, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> ServerProcess:
    args = [sys.executable, "-m", "coordinator.cli", "serve", "--config", config]
    return ServerProcess([*args, "--port", "0", "--num-cpus", "2", *extra], log_path, env)


@contextlib.contextmanager
def serving(
    config: str, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A started, ready ``tandem serve``; on exit it must stop cleanly and leave nothing behind."""
    proc = start_tandem(config, log_path, *extra, env=env)
    try:
        proc.wait_ready(300)
        yield proc
    finally:
        code, left = proc.stop()
    assert code == 0, f"unclean exit {code}:\n{proc.tail()}"
    assert not left, f"processes left behind: {left}"
