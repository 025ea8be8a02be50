"""The colocated topology (configs/colocated.yaml: one worker prefills and decodes, no KV
transfer), here with n-gram speculative decoding switched on, serves the same greedy outputs as
the in-process engine without speculation (lossless through the whole server), reports its
speculation metrics, and survives its worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
import yaml
from e2e_client import complete, metric, run_concurrently
from server_process import serving

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mixed_expected):
    tmp = tmp_path_factory.mktemp("coloc")
    config = yaml.safe_load(Path("configs/colocated.yaml").read_text())
    config["pools"]["colocated"]["speculative"] = {"method": "ngram", "num_speculative_tokens": 4}
    (tmp / "colocated-ngram.yaml").write_text(yaml.safe_dump(config))
    with serving(str(tmp / "colocated-ngram.yaml"), tmp / "server.log") as proc:
        yield proc


def test_colocated_equals_engine_streamed_and_not(
    server, mixed_prompts, mixed_max_tokens, mixed_expected
):
    prompts, max_tokens = mixed_prompts[::3], mixed_max_tokens[::3]  # 11, short and long
    expected = mixed_expected[::3]
    bodies = [
        {"prompt": ids, "max_tokens": n, "temperature": 0}
        for ids, n in zip(prompts, max_tokens, strict=True)
    ]
    streamed = run_concurrently(server.url, bodies)
    for i, ((text, finish, _), ref) in enumerate(zip(streamed, expected, strict=True)):
        assert (text, finish) == (ref.text, ref.finish_reason), f"request {i}"
    whole = complete(server.url, **bodies[0]).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (expected[0].text, expected[0].finish_reason)
    assert metric(server.url, "tandem_kv_blocks_total", pool="colocated") == 1024
    # speculation really ran: some proposals (chat answers repeat their prompt's words); worker
    # stats reach /metrics within a refresh interval
    deadline = time.monotonic() + 10
    while metric(server.url, "tandem_spec_draft_tokens_total", default=0) == 0:
        assert time.monotonic() < deadline, "no speculative proposals reported"
        time.sleep(0.25)
    accepted = metric(server.url, "tandem_spec_accepted_tokens_total")
    assert 0 <= accepted <= metric(server.url, "tandem_spec_draft_tokens_total")
    deadline = time.monotonic() + 30
    while metric(server.url, "tandem_kv_blocks_used", pool="colocated") != 0:
        assert time.monotonic() < deadline, "colocated KV blocks not freed"
        time.sleep(0.25)


def test_dead_worker_turns_health_503_and_fails_requests(server):
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    os.kill(server.worker_pids["colocated-0"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (health := requests.get(f"{server.url}/health", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "/health still 200 after the worker died"
        time.sleep(0.2)
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "pools": {"colocated": False}}
    failed = complete(server.url, prompt="Hello", max_tokens=4)
    assert failed.status_code == 500
    assert "no live colocated worker" in failed.json()["error"]["message"]
