"""One real disaggregated server (configs/local.yaml: a prefill and a decode actor on Ray, KV over
NIXL, HTTP) for the whole module; outputs must equal the in-process engine and HF transformers.

The last test kills the decode worker (a new one replaces it), so it stays last in this file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time

import aiohttp
import openai
import pytest
import requests
from e2e_client import MODEL, complete, greedy, metric, metric_above, run_concurrently
from hf_reference import hf_greedy
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


def test_traces_of_a_finished_and_an_aborted_request(server, chat_ids):
    """GET /v1/requests/{id}/trace: the phases of a disaggregated request are complete and
    ordered (each starts where the previous ended), and an aborted one's end where it left."""
    url = server.url
    body = {"model": MODEL, "prompt": chat_ids[0], "max_tokens": 8, "temperature": 0}
    done = requests.post(f"{url}/v1/completions", json=body, headers={"x-request-id": "traced"},
                         timeout=60)  # fmt: skip
    assert done.headers["x-request-id"] == "traced" and done.json()["id"] == "cmpl-traced"
    trace = requests.get(f"{url}/v1/requests/cmpl-traced/trace", timeout=10).json()
    phases = trace["phases"]
    assert [p["name"] for p in phases] == ["queue", "prefill", "transfer", "decode"]
    assert phases[0]["start_s"] == 0.0
    for before, after in zip(phases, phases[1:], strict=False):
        assert before["start_s"] <= before["end_s"] == after["start_s"] <= after["end_s"]
    (attempt,) = trace["attempts"]
    assert attempt["prefill_worker"] == "prefill-0#0" and attempt["transfer_bytes"] > 0
    choice, usage = done.json()["choices"][0], done.json()["usage"]
    assert (trace["finish_reason"], trace["num_output_tokens"], trace["retries"]) == (
        choice["finish_reason"], usage["completion_tokens"], 0)  # fmt: skip
    assert [e["name"] for e in trace["events"]] == ["route", "reserved", "finish"]

    async def leave_early() -> None:
        stream = {**body, "prompt": chat_ids[1], "max_tokens": 300, "stream": True}
        async with aiohttp.ClientSession() as session, session.post(
            f"{url}/v1/completions", json=stream, headers={"x-request-id": "left"}
        ) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"text":""' not in line:
                    break  # gone after the first token

    asyncio.run(leave_early())
    deadline = time.monotonic() + 30
    while (left := requests.get(f"{url}/v1/requests/cmpl-left/trace", timeout=10).json())[
            "finish_reason"] is None:  # fmt: skip
        assert time.monotonic() < deadline, left
        time.sleep(0.1)
    assert left["finish_reason"] == "abort" and left["num_output_tokens"] < 300
    assert [p["name"] for p in left["phases"]][:2] == ["queue", "prefill"]
    missing = requests.get(f"{url}/v1/requests/cmpl-never/trace", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trace_not_found"


def test_600_requests_with_30_percent_dropped_clients_leave_no_block(server, mixed_prompts):
    """The soak: clients that leave at random moments (before their first token, or a few
    tokens in) never leak a block, and never disturb the others."""
    rng = random.Random(7)
    plans = [(mixed_prompts[i % len(mixed_prompts)], rng.randint(2, 12),
              rng.randint(0, 4) if rng.random() < 0.3 else None) for i in range(600)]  # fmt: skip

    async def one(session: aiohttp.ClientSession, gate: asyncio.Semaphore, plan) -> str:
        ids, max_tokens, leave_after = plan
        payload = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                   "stream": True}  # fmt: skip
        async with gate:
            return await attempt(session, payload, leave_after)

    async def attempt(session: aiohttp.ClientSession, payload: dict, leave_after) -> str:
        # like a real client: a 429 (slots of clients that just left are still being freed)
        # is retried after a moment
        while True:
            resp = await session.post(f"{server.url}/v1/completions", json=payload)
            if resp.status != 429:
                break
            resp.release()
            await asyncio.sleep(0.2)
        async with resp:
            assert resp.status == 200, await resp.text()
            chunks = 0
            if leave_after == 0:  # gone before the first token
                resp.close()
                return "left"
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    chunks += 1
                    if event["choices"][0]["finish_reason"] is not None:
                        return "finished"
                    if chunks == leave_after:  # gone, mid-stream
                        resp.close()
                        return "left"
            return "cut"

    async def main() -> list[str]:
        gate = asyncio.Semaphore(24)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(one(session, gate, p) for p in plans))

    outcomes = asyncio.run(main())
    left = sum(p[2] is not None for p in plans)
    assert outcomes.count("left") <= left and outcomes.count("cut") == 0
    assert outcomes.count("finished") == 600 - outcomes.count("left")
    _wait_blocks_free(server.url)
    assert metric(server.url, "tandem_kv_leases_revoked_blocks_total") == 0


def test_kill_the_only_decode_worker_requests_wait_for_its_replacement(server, llm, mixed_prompts):
    """kill -9 of the only decode worker while 24 requests stream: /health reports the pool down
    until its replacement joins; the requests wait for it, resume on it and finish exactly as
    an undisturbed run; the new incarnation takes KV over NIXL."""
    ids = mixed_prompts[:24]
    want = [o.text for o in llm.generate(ids, greedy(32, ignore_eos=True))]
    bodies = [{"prompt": i, "max_tokens": 32, "temperature": 0, "ignore_eos": True} for i in ids]
    url = server.url
    old_pid = server.worker_pids["decode-0"]
    moved = metric(url, "tandem_request_migrations_total", default=0.0)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(v=run_concurrently(url, bodies)))
    thread.start()
    down = None
    try:
        deadline = time.monotonic() + 60
        while metric(url, "tandem_running_requests") < 8:
            assert time.monotonic() < deadline, "the streams never reached decode"
            time.sleep(0.05)
    finally:
        os.kill(old_pid, signal.SIGKILL)  # also ends the streams if the wait above failed
        killed = time.monotonic()
        while time.monotonic() - killed < 10 and down is None:
            health = requests.get(f"{url}/health", timeout=10)
            if health.status_code == 503:
                down = health.json()
            time.sleep(0.05)
        thread.join(300)
    assert down == {"status": "unavailable", "pools": {
        "prefill": {"status": "ok", "live": 1, "target": 1},
        "decode": {"status": "down", "live": 0, "target": 1}}}  # fmt: skip
    assert [text for text, _, _ in result["v"]] == want
    assert metric(url, "tandem_request_migrations_total") > moved
    assert server.new_pid("decode-0", old_pid) != old_pid
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    sent = metric(url, "tandem_kv_transfer_bytes_total", backend="nixl")
    (ref,) = llm.generate(["Hello"], greedy(4))
    assert complete(url, prompt="Hello", max_tokens=4, temperature=0).json()[
        "choices"][0]["text"] == ref.text  # fmt: skip
    assert metric_above(url, "tandem_kv_transfer_bytes_total", sent, backend="nixl") > sent
    _wait_blocks_free(url)


def _wait_blocks_free(url: str, timeout_s: float = 60.0) -> None:
    """Both pools back to 0 used KV blocks (aborts and transfers land asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = {p: metric(url, "tandem_kv_blocks_used", pool=p) for p in ("prefill", "decode")}
        if used == {"prefill": 0, "decode": 0}:
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {used}"
        time.sleep(0.25)
