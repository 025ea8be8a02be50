"""One real disaggregated server (configs/local.yaml: a prefill and a decode actor on Ray, KV over
NIXL, HTTP) for the whole module; outputs must equal the in-process engine and HF transformers.

The last test kills the decode worker, so it must stay last in this file.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest
import requests
from conftest import hf_greedy
from e2e_client import MODEL, complete, greedy, metric, run_concurrently
from server_process import serving

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mixed_expected):  # references first: workers would compete
    with serving("configs/local.yaml", tmp_path_factory.mktemp("disagg") / "server.log") as proc:
        yield proc


def test_greedy_completions_equal_engine_and_hf(server, llm, chat_ids, hf_smollm2):
    prompts = chat_ids[:2]
    expected = llm.generate(prompts, greedy(20))
    # the prefill worker's prefix cache: the second prompt shares the system prompt's full blocks
    common = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    cached = [0, min(common, len(prompts[1]) - 1) // 16 * 16]
    for ids, ref, num_cached in zip(prompts, expected, cached, strict=True):
        assert ref.token_ids == hf_greedy(hf_smollm2, ids, 20)  # the reference is right
        body = complete(server.url, prompt=ids, max_tokens=20, temperature=0, logprobs=0).json()
        choice = body["choices"][0]
        assert choice["text"] == ref.text
        assert choice["finish_reason"] == ref.finish_reason
        # token for token, not just the same text
        assert choice["logprobs"]["tokens"] == [llm.tokenizer.decode([t]) for t in ref.token_ids]
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(ref.token_ids),
            "total_tokens": len(ids) + len(ref.token_ids),
            "prompt_tokens_details": {"cached_tokens": num_cached},
        }


def test_openai_client_streamed_and_not(server, llm):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    question = "Name a large animal that lives in the ocean."
    (ref,) = llm.generate([llm.encode_chat(question)], greedy(20))
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0
    )
    assert whole.choices[0].message.content == ref.text
    assert whole.usage.completion_tokens == len(ref.token_ids)
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    (plain,) = llm.generate(["The capital of France is"], greedy(12))
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.text


def test_stop_string_ends_the_request_and_frees_blocks(server, llm, chat_ids):
    ids = chat_ids[2]
    (ref,) = llm.generate([ids], greedy(40, stop=[" the"]))
    assert ref.finish_reason == "stop"  # the stop string is really hit
    body = complete(server.url, prompt=ids, max_tokens=40, temperature=0, stop=[" the"]).json()
    assert body["choices"][0]["text"] == ref.text
    assert body["choices"][0]["finish_reason"] == "stop"
    _wait_blocks_free(server.url)


def test_32_concurrent_streams_equal_engine(
    server, mixed_prompts, mixed_max_tokens, mixed_expected
):
    max_tokens, expected = mixed_max_tokens, mixed_expected
    bodies = [
        {"prompt": ids, "max_tokens": n, "temperature": 0}
        for ids, n in zip(mixed_prompts, max_tokens, strict=True)
    ]
    results = run_concurrently(server.url, bodies)
    for i, ((text, finish, _), ref) in enumerate(zip(results, expected, strict=True)):
        assert (text, finish) == (ref.text, ref.finish_reason), f"request {i}"
    _wait_blocks_free(server.url)


def test_disconnects_free_blocks_on_both_pools(server, mixed_prompts):
    disconnects = {"endpoint": "completions", "outcome": "disconnect"}
    before = metric(server.url, "tandem_requests_total", default=0.0, **disconnects)
    bodies = [{"prompt": ids, "max_tokens": 200, "temperature": 0} for ids in mixed_prompts[:20]]
    results = run_concurrently(server.url, bodies, stop_after=3)
    assert all(len(events) == 3 for _, _, events in results)  # each left after 3 tokens
    _wait_blocks_free(server.url)
    after = metric(server.url, "tandem_requests_total", **disconnects)
    assert after - before == 20


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": [1] * 2100}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 4000}, 400, "max_tokens"),
        ({"prompt": ""}, 400, "prompt"),
    ],
)
def test_errors_leave_the_server_healthy(server, llm, body, status, param):
    response = requests.post(
        f"{server.url}/v1/completions", json={"model": MODEL, **body}, timeout=30
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    (ref,) = llm.generate(["Hello"], greedy(4))
    assert complete(server.url, prompt="Hello", max_tokens=4, temperature=0).json()[
        "choices"
    ][0]["text"] == ref.text


def test_kv_transfer_and_latency_metrics(server):
    assert metric(server.url, "tandem_kv_transfer_bytes_total", backend="nixl") > 0
    assert metric(server.url, "tandem_kv_blocks_total", pool="decode") == 1024
    assert metric(server.url, "tandem_kv_blocks_total", pool="prefill") == 256
    assert metric(server.url, "tandem_time_to_first_token_seconds_count") >= 32
    assert metric(server.url, "tandem_inter_token_latency_seconds_count") > 100


def test_dead_decode_worker_fails_its_requests_not_the_server(server):
    """Kills the decode actor's process mid-stream: that request ends with an error event, the
    pool turns unhealthy, new requests get a clear error, and the server keeps answering."""
    result: dict = {}

    def stream() -> None:
        result["value"] = run_concurrently(
            server.url, [{"prompt": "Count from one to a thousand:", "max_tokens": 1500}]
        )[0]

    decode_pid = server.worker_pids["decode-0"]
    thread = threading.Thread(target=stream)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while metric(server.url, "tandem_running_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few decode steps in
    finally:
        os.kill(decode_pid, signal.SIGKILL)  # also ends the stream if the wait above failed
        thread.join(120)
    text, finish, events = result["value"]
    assert text and finish is None
    assert "decode-0" in events[-1]["error"]["message"]
    health = requests.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["pools"] == {"prefill": True, "decode": False}
    failed = complete(server.url, prompt="Hello", max_tokens=4)
    assert failed.status_code == 500
    assert "no live decode worker" in failed.json()["error"]["message"]
    assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 200


def _wait_blocks_free(url: str, timeout_s: float = 60.0) -> None:
    """Both pools back to 0 used KV blocks (aborts and transfers land asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = {p: metric(url, "tandem_kv_blocks_used", pool=p) for p in ("prefill", "decode")}
        if used == {"prefill": 0, "decode": 0}:
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {used}"
        time.sleep(0.25)
