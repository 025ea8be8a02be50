"""Ctrl-C while ``tandem serve`` starts ends the start: no URL is announced, the process exits
cleanly and leaves no process behind. Before, a Ctrl-C inside ``ray.init`` crashed the process
(SIGSEGV in Ray's teardown), and one while the workers started waited for them to be ready (up to
the 900 s ready timeout if one never was) and then served."""

from __future__ import annotations

import time

import pytest
from server_process import start_tandem


def ctrl_c_once_logged(tmp_path, line: str) -> str:
    """Start ``tandem serve``, SIGINT it as soon as its output has ``line``; returns the log."""
    proc = start_tandem("configs/local.yaml", tmp_path / "serve.log")
    deadline = time.monotonic() + 120
    while line not in proc.log_path.read_text():
        assert proc.proc.poll() is None, proc.tail()
        assert time.monotonic() < deadline, proc.tail()
        time.sleep(0.02)
    code, left = proc.stop(timeout_s=60)
    log = proc.log_path.read_text()
    assert code == 0, f"exit {code}:\n{proc.tail()}"
    assert not left, f"processes left behind: {left}"
    assert proc.url is None and "Tandem: serving" not in log, "it finished starting first"
    assert "stopped while starting" in log
    return log


@pytest.mark.slow
def test_ctrl_c_while_ray_starts(tmp_path):
    # Ray prints this inside ray.init, before its driver has connected
    ctrl_c_once_logged(tmp_path, "Started a local Ray instance")


@pytest.mark.slow
def test_ctrl_c_while_the_workers_start(tmp_path):
    log = ctrl_c_once_logged(tmp_path, "starting 2 workers: decode-0, prefill-0")
    assert "ready in pid" not in log  # the workers were still loading the model
