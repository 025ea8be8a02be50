"""The colocated topology (configs/colocated.yaml: one worker prefills and decodes, no KV
transfer), here with n-gram speculative decoding switched on, serves the same greedy outputs as
the in-process engine without speculation (lossless through the whole server), reports its
speculation metrics, serves n = 2 greedy choices equal to it, and survives its worker: a killed
one is replaced and its requests resume."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from e2e_client import complete, metric, run_concurrently
from server_process import serving

from core.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mixed_expected):
    tmp = tmp_path_factory.mktemp("coloc")
    config = yaml.safe_load(Path("configs/colocated.yaml").read_text())
    config["pools"]["colocated"]["speculative"] = {"method": "ngram", "num_speculative_tokens": 4}
    (tmp / "colocated-ngram.yaml").write_text(yaml.safe_dump(config))
    with serving(str(tmp / "colocated-ngram.yaml"), tmp / "server.log") as proc:
        yield proc


def test_startup_objects_frozen(server):
    """The coordinator and its worker each froze what they built while starting
    (core/long_lived.py), once started: a started process holds far more than 10k objects."""
    log = server.log_path.read_text()
    coordinator = re.search(r"tandem.launch (\d+) objects frozen in \d+ ms", log)
    worker = re.search(r"ready in pid \d+ \(incarnation 0; (\d+) objects frozen in \d+ ms\)", log)
    assert coordinator and worker, log[-3000:]
    assert int(coordinator.group(1)) > 10_000 and int(worker.group(1)) > 10_000


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
    # n = 2: choice 1 waits for choice 0's prompt blocks, then prefills its tail over them
    both = complete(server.url, **bodies[0], n=2).json()["choices"]
    assert [(c["index"], c["text"]) for c in both] == [(0, whole["text"]), (1, whole["text"])]
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


def test_killed_worker_is_replaced_and_its_requests_resume_on_the_new_one(server, llm, chat_ids):
    """kill -9 of the only colocated worker mid-stream: the pool is down (503) until a new
    incarnation joins, then the streams resume on it (speculating) and end exactly as
    undisturbed runs."""
    params = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True}
    want = [o.text for o in llm.generate(chat_ids[:4], SamplingParams(**params))]
    result: dict = {}
    bodies = [{"prompt": ids, **params} for ids in chat_ids[:4]]
    ids = [f"colo-{i}" for i in range(len(bodies))]
    thread = threading.Thread(
        target=lambda: result.update(v=run_concurrently(server.url, bodies, ids=ids))
    )
    thread.start()
    down = None
    try:
        deadline = time.monotonic() + 60
        while metric(server.url, "tandem_running_requests") < 4:
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.05)
        time.sleep(0.3)  # a few tokens in
    finally:
        os.kill(server.worker_pids["colocated-0"], signal.SIGKILL)
        killed = time.monotonic()
        while down is None and time.monotonic() - killed < 10:
            if (health := requests.get(f"{server.url}/health", timeout=10)).status_code == 503:
                down = health.json()
            time.sleep(0.05)
        thread.join(300)
    assert down == {"status": "unavailable",
                    "pools": {"colocated": {"status": "down", "live": 0, "target": 1}}}
    assert [text for text, _, _ in result["v"]] == want
    assert metric(server.url, "tandem_request_migrations_total") >= 1
    trace = requests.get(f"{server.url}/v1/requests/cmpl-colo-0/trace", timeout=10).json()
    (failed, resumed) = trace["attempts"]  # killed once, resumed on the new incarnation
    assert failed["failure"]["fault"] == "worker_died"
    assert failed["decode_worker"] == "colocated-0#0"
    assert resumed["decode_worker"] == "colocated-0#1" and resumed["resumed_after_tokens"] > 0
    names = [p["name"] for p in trace["phases"]]
    assert names[:3] == ["queue", "prefill", "decode"] and names[-1] == "decode #1"
    assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
