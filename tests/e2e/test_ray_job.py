"""The cluster path: ``ray start --head`` (from this venv), then ``ray job submit --working-dir .
-- python -m coordinator.launch --config configs/local.yaml --address auto``, as in the README.

The head runs with ``--block`` as our own child, and is stopped through that process rather than
with ``ray stop`` (which stops every Ray on the machine, other people's test clusters included).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
from e2e_client import complete, greedy
from server_process import ROOT, free_port, server_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

RAY = str(Path(sys.executable).parent / "ray")


def _ray(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=timeout_s
    )


def _wait_http(url: str, timeout_s: float, what: str, check=lambda r: r.ok,
               gone=lambda: False) -> requests.Response:  # fmt: skip
    """Poll ``url`` until ``check`` passes; fail after ``timeout_s`` or once ``gone()``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert not gone(), f"{what}: its process exited"
        try:
            response = requests.get(url, timeout=5)
            if check(response):
                return response
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{what} did not come up in {timeout_s}s"
        time.sleep(1)


def _stop_head(head: subprocess.Popen, children: list[psutil.Process]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        if head.poll() is None:
            head.send_signal(sig)
            try:
                head.wait(30)
            except subprocess.TimeoutExpired:
                continue
    if head.poll() is None:
        head.kill()
        head.wait(10)
    deadline = time.monotonic() + 20
    while any(p.is_running() for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in children:  # this head's own processes only, by pid
        if p.is_running():
            p.kill()


def test_ray_job_submit_serves_on_a_started_cluster(tmp_path, llm):
    dashboard, http_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="tj", dir="/tmp")  # short: Ray's socket paths must fit
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    head_log = open(tmp_path / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
         "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
         "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
         *[str(x) for kv in ports.items() for x in kv]],  # fmt: skip
        cwd=ROOT,
        env=server_env(),
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    job_id = None
    try:
        try:
            _wait_http(f"{address}/api/version", 180, "the Ray dashboard",
                       gone=lambda: head.poll() is not None)  # fmt: skip
        except AssertionError:
            head_log.flush()
            tail = (tmp_path / "head.log").read_text()[-3000:]
            raise AssertionError(f"the Ray dashboard did not come up (head exit code "
                                 f"{head.poll()}); head log tail:\n{tail}") from None
        submitted = _ray(
            "job", "submit", "--address", address, "--working-dir", ".", "--no-wait", "--",
            "python", "-m", "coordinator.launch", "--config", "configs/local.yaml",
            "--address", "auto", "--port", str(http_port),
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
        url = f"http://127.0.0.1:{http_port}"

        def job_alive(response: requests.Response) -> bool:
            status = requests.get(f"{address}/api/jobs/{job_id}", timeout=5).json()["status"]
            if status not in ("PENDING", "RUNNING"):
                logs = _ray("job", "logs", "--address", address, job_id).stdout
                raise AssertionError(f"job {status}:\n{logs[-4000:]}")
            return response.ok

        _wait_http(f"{url}/health", 300, "the job's server", check=job_alive)
        (ref,) = llm.generate(["The capital of France is"], greedy(12))
        body = complete(url, prompt="The capital of France is", max_tokens=12, temperature=0)
        assert body.json()["choices"][0]["text"] == ref.text
        stopped = _ray("job", "stop", "--address", address, job_id)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        status = requests.get(f"{address}/api/jobs/{job_id}", timeout=5).json()["status"]
        assert status == "STOPPED"
        job_id = None
        deadline = time.monotonic() + 30
        while _answers(f"{url}/health"):  # the server goes down with its job
            assert time.monotonic() < deadline, "the server outlived its stopped job"
            time.sleep(0.5)
    finally:
        if job_id is not None:
            _ray("job", "stop", "--address", address, job_id)
        children = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        _stop_head(head, children)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)
    except requests.ConnectionError:
        return False
    return True
