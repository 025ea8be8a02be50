"""``tandem serve --config YAML --port 0`` as a subprocess for one benchmark target.

The server gets its own session (process group), its output goes to a log file, and ``stop()``
sends SIGINT as a user at a terminal would (the server then stops its workers and its Ray),
killing the group only if it has not exited within a minute.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from coordinator.worker_specs import total_cpus
from core.config import load_config

URL_LINE = re.compile(r"Tandem: serving \S+ at (http://\S+)")
START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 60.0


def config_cpus(path: str) -> float:
    """CPUs the topology reserves in all (replicas x resources.num_cpus, every pool)."""
    return total_cpus(load_config(path))


class TandemServer:
    def __init__(self, config: str, log_path: Path, num_cpus: int | None = None) -> None:
        self.config = config
        self.log_path = log_path
        cpus = num_cpus if num_cpus is not None else math.ceil(config_cpus(config))
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--config", config,
             "--port", "0", "--num-cpus", str(cpus)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # keeps the pipe drained for the server's whole life
            self._log.write(line)
            self._log.flush()
            if self.url is None and (m := URL_LINE.search(line)) is not None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # it exited: wake the waiter

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        if not self._ready.wait(timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError(f"tandem serve --config {self.config} did not start; see "
                               f"{self.log_path}")  # fmt: skip
        return self.url

    def stop(self) -> int | None:
        """Exit code (None if it had to be killed)."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            code = self.proc.returncode
        self._reader.join(10)
        self._log.close()
        return code

    def __enter__(self) -> TandemServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
