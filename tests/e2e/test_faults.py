"""Requests survive their workers on a real 2 prefill + 2 decode server (Ray actors, KV over NIXL,
HTTP): kill -9 of a decode worker under 24 streams, of a prefill worker during prefill, and a
fault injected at every stage of a request's life. Every request finishes with exactly the
undisturbed greedy text (or, past the retry bound, a clean error), dead workers come back, and at
the end no KV block is held anywhere and the lease audit never had to revoke one.

Faults are armed over ``POST /admin/faults`` (the server runs with TANDEM_FAULT_INJECTION=1) and
target one request by its ``x-request-id``, so they fire deterministically, once.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests
import yaml
from e2e_client import MODEL, greedy, metric, metric_above, run_concurrently
from server_process import ROOT, serving

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STORY = "The river ran past the old mill, and the miller counted the sacks of grain. "
MAX_TOKENS = 24
HANG_TIMEOUT_S = 5.0


def topology() -> dict:
    """configs/local-2p2d.yaml, with deadlines short enough for tests and round-robin routing
    (so that both workers of each pool serve the kill tests' requests)."""
    config = yaml.safe_load((ROOT / "configs/local-2p2d.yaml").read_text())
    config["pools"]["prefill"]["scheduler"]["chunk_size"] = 64  # long prompts: several chunks
    config["kv_transfer"]["timeout_s"] = 2
    config["coordinator"].update(
        routing="round_robin", workers={"hang_timeout_s": HANG_TIMEOUT_S}
    )
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory, llm):  # the reference engine first: workers would compete
    path = tmp_path_factory.mktemp("faults") / "2p2d.yaml"
    path.write_text(yaml.safe_dump(topology()))
    with serving(str(path), path.parent / "server.log",
                 env={"TANDEM_FAULT_INJECTION": "1"}) as proc:  # fmt: skip
        yield proc


@pytest.fixture(scope="module")
def prompts(llm, chat_ids) -> dict[str, list[list[int]]]:
    texts = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "Water boils at"]
    short = chat_ids + [llm.tokenizer.encode(t) for t in texts]
    long = [llm.tokenizer.encode(STORY * k + "Then") for k in range(24, 32)]  # ~400-550 tokens
    return {"short": short, "long": long}


def body(ids: list[int], max_tokens: int = MAX_TOKENS) -> dict:
    return {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def expected_texts(llm, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[str]:
    return [o.text for o in llm.generate(prompts, greedy(max_tokens, ignore_eos=True))]


def complete_as(url: str, request_id: str, ids: list[int], **extra) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": MODEL, **body(ids), **extra},
                         headers={"x-request-id": request_id}, timeout=180)  # fmt: skip


def arm(url: str, pool: str, **fault) -> None:
    response = requests.post(f"{url}/admin/faults", json={"worker": pool, **fault}, timeout=30)
    assert response.status_code == 200, response.text


def retries(url: str, stage: str, reason: str) -> float:
    return metric(url, "tandem_request_retries_total", default=0.0, stage=stage, reason=reason)


def all_retries(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("tandem_request_retries_total{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def wait_metric(url: str, name: str, value: float, timeout_s: float, **labels) -> float:
    """Seconds until ``name{labels}`` equals ``value``."""
    start = time.monotonic()
    while metric(url, name, default=-1.0, **labels) != value:
        assert time.monotonic() - start < timeout_s, f"{name}{labels} != {value}"
        time.sleep(0.2)
    return time.monotonic() - start


def stream_while(url: str, bodies: list[dict], action) -> list:
    """Stream ``bodies`` concurrently and run ``action()`` while they are under way."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(v=run_concurrently(url, bodies)))
    thread.start()
    try:
        action()
    finally:
        thread.join(300)
    return result["v"]


def test_kill_a_decode_worker_under_24_streams(server, llm, prompts):
    ids = (prompts["short"] * 2)[:24]
    want = expected_texts(llm, ids)
    url = server.url
    old_pid = server.worker_pids["decode-0"]
    moved = metric(url, "tandem_request_migrations_total", default=0.0)
    killed: list[float] = []

    gaps = metric(url, "tandem_inter_token_latency_seconds_count", default=0.0)

    def kill() -> None:
        deadline = time.monotonic() + 60
        # both decode workers well into decoding (round robin): ~3 tokens each on average
        while metric(url, "tandem_inter_token_latency_seconds_count", default=0.0) < gaps + 72:
            assert time.monotonic() < deadline, "the streams never reached decode"
            time.sleep(0.05)
        os.kill(old_pid, signal.SIGKILL)
        killed.append(time.monotonic())

    results = stream_while(url, [body(i) for i in ids], kill)
    texts = [text for text, _, _ in results]
    assert sum(t == w for t, w in zip(texts, want, strict=True)) == 24  # >= 99 %: all of them
    assert metric(url, "tandem_request_migrations_total") > moved  # decode-0's moved on
    assert retries(url, "decode", "worker_died") >= 1
    wait_metric(url, "tandem_worker_restarts_total", 1, 60, pool="decode")
    assert time.monotonic() - killed[0] < 30  # whole again within 30 s of the kill
    assert metric(url, "tandem_workers_live", pool="decode") == 2
    assert server.new_pid("decode-0", old_pid) != old_pid  # a new incarnation
    # New requests use the new incarnation (round robin: half of them): KV moves, no faults.
    sent = metric(url, "tandem_kv_transfer_bytes_total", backend="nixl")
    faults = all_retries(url)
    again = run_concurrently(url, [body(i) for i in ids[:8]])
    assert [text for text, _, _ in again] == want[:8]
    assert metric_above(url, "tandem_kv_transfer_bytes_total", sent, backend="nixl") > sent
    assert all_retries(url) == faults


def test_kill_a_prefill_worker_during_prefill(server, llm, prompts):
    ids = prompts["long"] * 2  # 16 prompts of ~400-550 tokens
    want = expected_texts(llm, ids, 8)
    url = server.url
    old_pid = server.worker_pids["prefill-0"]

    def prefilling() -> bool:
        """prefill-0 itself holds KV blocks (the pool's gauge may be prefill-1's alone)."""
        workers = requests.get(f"{url}/v1/status", timeout=10).json()["workers"]
        return any(w["name"] == "prefill-0" and w["kv_blocks_used"] > 0 for w in workers)

    def kill() -> None:
        deadline = time.monotonic() + 60
        while not prefilling():
            assert time.monotonic() < deadline, "prefill never started"
            time.sleep(0.02)
        os.kill(old_pid, signal.SIGKILL)

    results = stream_while(url, [body(i, 8) for i in ids], kill)
    assert [text for text, _, _ in results] == want
    assert sum(retries(url, s, "worker_died") for s in ("queued", "prefill", "transfer")) >= 1
    wait_metric(url, "tandem_workers_live", 2, 60, pool="prefill")
    assert server.new_pid("prefill-0", old_pid) != old_pid


# (pool, fault, prompt kind, the retry it must cause: (stage, reason)), in an order that lets a
# worker killed by one case restart while the next case uses the other pool
STAGES = {
    "prefill-queued-exit": ("prefill", dict(point="queued", action="exit"), "short",
                            ("prefill", "worker_died")),
    "mid-decode-exit": ("decode", dict(point="mid_decode", action="exit", nth=4), "short",
                        ("decode", "worker_died")),
    "prefill-mid-exit": ("prefill", dict(point="mid_prefill", action="exit"), "long",
                         ("prefill", "worker_died")),
    "decode-hang": ("decode", dict(point="mid_decode", action="hang", nth=3), "short",
                    ("decode", "worker_hung")),
    "after-first-token-exit": ("prefill", dict(point="after_first_token", action="exit"), "short",
                               (None, "worker_died")),  # prefill or transfer: a race, both fine
    "decode-step-raise": ("decode", dict(point="step", action="raise", nth=2), "short",
                          ("decode", "step_failed")),
    "prefill-step-raise": ("prefill", dict(point="step", action="raise"), "long",
                           ("prefill", "step_failed")),
    "transfer-fail": ("prefill", dict(point="transfer", action="fail"), "short",
                      ("transfer", "transfer_failed")),
    "transfer-lost": ("prefill", dict(point="transfer", action="drop"), "short",
                      ("transfer", "transfer_timeout")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STAGES))
def test_a_fault_at_each_stage_only_costs_latency(server, llm, prompts, case):
    pool, fault, kind, (stage, reason) = STAGES[case]
    ids = prompts[kind][len(case) % len(prompts[kind])]
    if kind == "long":  # a prefix no worker has cached: a prefill cache hit would skip chunks,
        ids = llm.tokenizer.encode(f"[{case}] ") + ids  # and with them the mid-prefill point
    (want,) = expected_texts(llm, [ids])
    url = server.url
    stages = [stage] if stage else ["prefill", "transfer"]
    # every worker of the pool up (one killed by an earlier case may still be restarting), so
    # the fault is armed wherever the request may go
    wait_metric(url, "tandem_workers_live", 2, 90, pool=pool)
    before = sum(retries(url, s, reason) for s in stages)
    arm(url, pool, request_id=f"cmpl-{case}", **fault)
    response = complete_as(url, case, ids)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == want
    assert sum(retries(url, s, reason) for s in stages) == before + 1
    trace = requests.get(f"{url}/v1/requests/cmpl-{case}/trace", timeout=10).json()
    failed, last = trace["attempts"][0], trace["attempts"][-1]
    assert failed["failure"]["fault"] == reason and failed["then"] in ("retry", "recompute")
    assert last["failure"] is None and trace["retries"] == len(trace["attempts"]) - 1


def test_past_the_retry_bound_a_clean_error(server, prompts):
    url = server.url
    for pool in ("prefill", "decode"):
        wait_metric(url, "tandem_workers_live", 2, 90, pool=pool)
    for _ in range(2):  # every attempt of this request fails its first decode step
        arm(url, "decode", point="step", action="raise", request_id="cmpl-doomed", attempt=None)
    response = complete_as(url, "doomed", prompts["short"][0])
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "step_failed" and "attempt 3" in error["message"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_no_block_left_and_every_pool_whole(server):
    url = server.url
    for pool in ("prefill", "decode"):
        wait_metric(url, "tandem_workers_live", 2, 90, pool=pool)
        wait_metric(url, "tandem_kv_blocks_used", 0, 30, pool=pool)
    # every replacement accounted for: kill + queued + mid-prefill + after-first-token exits;
    # kill + mid-decode exit + hang on decode
    assert metric(url, "tandem_worker_restarts_total", pool="prefill") == 4
    assert metric(url, "tandem_worker_restarts_total", pool="decode") == 3
    # the coordinator's own bookkeeping freed everything: the audit never had to
    assert metric(url, "tandem_kv_leases_revoked_blocks_total") == 0
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok"
