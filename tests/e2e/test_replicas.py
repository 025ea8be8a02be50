"""Many replicas under one coordinator, on a real 2 prefill + 2 decode server (Ray, NIXL, HTTP)
with ``routing: kv_aware`` and local prefill of prompts a decode worker lacks at most 24 tokens of:
a burst spreads over the decode workers, a prompt goes where its prefix is cached (and the decode
side sends fewer bytes for it), short prompts are prefilled locally with the same tokens, and
the decode pool scales 2 -> 3 -> 1 under a steady stream without a failed request.
"""

from __future__ import annotations

import collections
import random
import threading
import time

import pytest
import requests
import yaml
from e2e_client import MODEL, greedy, metric, run_concurrently
from server_process import ROOT, serving

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

LOCAL_MAX_TOKENS = 24
SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, "
          "name the port when you know it, and never invent a tracking number. ") * 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, llm):  # the reference engine first: workers would compete
    config = yaml.safe_load((ROOT / "configs/local-2p2d.yaml").read_text())
    config["coordinator"].update(
        routing="kv_aware", local_prefill={"max_tokens": LOCAL_MAX_TOKENS},
        workers={"drain_timeout_s": 60},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("replicas") / "2p2d-kv.yaml"
    path.write_text(yaml.safe_dump(config))
    # CPUs for a fifth worker: the decode pool grows to 3
    with serving(str(path), path.parent / "server.log", "--num-cpus", "3") as proc:
        yield proc


def complete_as(url: str, request_id: str, ids: list[int], max_tokens: int = 12) -> dict:
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
    response = requests.post(f"{url}/v1/completions", json=body,
                             headers={"x-request-id": request_id}, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


def trace(url: str, request_id: str) -> dict:
    return requests.get(f"{url}/v1/requests/cmpl-{request_id}/trace", timeout=10).json()


def settle(url: str, timeout_s: float = 30.0) -> None:
    """Until the coordinator's stats show every decode worker idle with no KV in use, twice in
    a row: its load view no longer counts the requests placed before (they are reset by a stats
    answer), so a routing decision that follows weighs cached blocks against real load."""
    deadline, idle = time.monotonic() + timeout_s, 0
    while idle < 2:
        assert time.monotonic() < deadline, "the decode workers never went idle"
        workers = requests.get(f"{url}/v1/status", timeout=10).json()["workers"]
        quiet = all(w["running"] == 0 and w["kv_blocks_used"] == 0
                    for w in workers if w["pool"] == "decode")  # fmt: skip
        idle = idle + 1 if quiet else 0
        time.sleep(0.3)


def test_a_burst_spreads_over_the_decode_workers(server):
    rng = random.Random(3)
    prompts = [[rng.randrange(1000, 40000) for _ in range(64)] for _ in range(24)]  # no sharing
    ids = [f"burst-{i}" for i in range(24)]
    bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts]
    results = run_concurrently(server.url, bodies, ids=ids)
    assert all(finish == "length" for _, finish, _ in results)
    decoders = collections.Counter(trace(server.url, i)["attempts"][-1]["decode_worker"]
                                   for i in ids)  # fmt: skip
    assert sorted(decoders.values()) in ([10, 14], [11, 13], [12, 12]), decoders


def test_a_prompt_goes_where_its_prefix_is_cached(server, llm):
    url = server.url
    system = llm.tokenizer.encode(SYSTEM)
    # questions longer than local_prefill.max_tokens: even with the system prompt cached on
    # decode, these go to a prefill worker (a shorter one would be prefilled on decode)
    asks = [llm.tokenizer.encode(
        f" Question {i}: parcel {i} left the northern warehouse two days ago on a truck bound for "
        "the coast, stopped overnight at the river depot, and was scanned again this morning at a "
        "sorting hub near the harbour; where is it now, and when will it reach the customer?")
        for i in range(3)]  # fmt: skip
    assert all(len(ask) > LOCAL_MAX_TOKENS + 16 for ask in asks)
    prompts = [system + ask for ask in asks]
    want = [o.text for o in llm.generate(prompts, greedy(12))]
    hits = {pool: metric(url, "tandem_prefix_hit_tokens_total", default=0.0, pool=pool)
            for pool in ("prefill", "decode")}  # fmt: skip
    settle(url)  # the burst before is over for the router too
    first = complete_as(url, "prefix-0", prompts[0])
    assert first["choices"][0]["text"] == want[0]
    settle(url)  # and the workers' KV events have reached the coordinator's index
    where = trace(url, "prefix-0")["attempts"][-1]
    for i in (1, 2):
        body = complete_as(url, f"prefix-{i}", prompts[i])
        assert body["choices"][0]["text"] == want[i]  # unchanged by the reuse
        settle(url)
        again = trace(url, f"prefix-{i}")["attempts"][-1]
        assert (again["prefill_worker"], again["decode_worker"]) == (
            where["prefill_worker"], where["decode_worker"])  # fmt: skip
        assert again["cached_blocks"] >= len(system) // 16 - 1  # decode had the system prompt
        # only the blocks decode lacked crossed the wire: the question's, not the system prompt's
        per_block = where["transfer_bytes"] // where["kv_blocks"]
        assert again["transfer_bytes"] == (again["kv_blocks"] - again["cached_blocks"]) * per_block
        assert 0 < again["transfer_bytes"] < where["transfer_bytes"] / 2
    for pool in ("prefill", "decode"):
        gained = metric(url, "tandem_prefix_hit_tokens_total", pool=pool) - hits[pool]
        assert gained >= 2 * (len(system) // 16 - 1) * 16  # each worker counted its hits
    assert metric(url, "tandem_routing_decisions_total", pool="decode", reason="prefix") >= 2


def test_short_prompts_prefill_locally_with_the_same_tokens(server, llm, chat_ids):
    url = server.url
    short = llm.tokenizer.encode("The quick brown fox")
    assert len(short) <= LOCAL_MAX_TOKENS < len(chat_ids[1])
    want = [o.text for o in llm.generate([short, chat_ids[1]], greedy(12))]
    local = metric(url, "tandem_prefill_location_total", default=0.0, where="local",
                   reason="short")  # fmt: skip
    assert complete_as(url, "short", short)["choices"][0]["text"] == want[0]
    assert complete_as(url, "long", chat_ids[1])["choices"][0]["text"] == want[1]
    assert trace(url, "short")["attempts"][-1]["where"] == "local"
    assert trace(url, "long")["attempts"][-1]["where"] == "remote"
    assert [p["name"] for p in trace(url, "short")["phases"]] == ["queue", "prefill", "decode"]
    assert metric(url, "tandem_prefill_location_total", where="local", reason="short") == local + 1


def test_scale_decode_2_to_3_to_1_under_a_steady_stream(server, llm, chat_ids):
    url = server.url
    prompts = chat_ids[:6]
    want = [o.text for o in llm.generate(prompts, greedy(16, ignore_eos=True))]
    done: list[tuple[str, str, str | None, int]] = []  # (request id, text, finish, prompt)
    stop = threading.Event()

    def stream(worker: int) -> None:
        n = 0
        while not stop.is_set():
            rid = f"steady-{worker}-{n}"
            i = (worker + n) % len(prompts)
            (text, finish, _), = run_concurrently(
                url, [{"prompt": prompts[i], "max_tokens": 16, "temperature": 0,
                       "ignore_eos": True}], ids=[rid])  # fmt: skip
            done.append((rid, text, finish, i))
            n += 1

    def scale(replicas: int) -> None:
        response = requests.post(f"{url}/admin/pools/decode/replicas",
                                 json={"replicas": replicas}, timeout=30)  # fmt: skip
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 120
        while True:
            pool = requests.get(f"{url}/health", timeout=10).json()["pools"]["decode"]
            if pool["live"] == pool["target"] == replicas:
                return
            assert time.monotonic() < deadline, pool
            time.sleep(0.2)

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        scale(3)
        time.sleep(2.0)  # requests reach decode-2
        scale(1)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert len(done) >= 12
    for rid, text, finish, i in done:  # none failed, none duplicated or cut
        assert (text, finish) == (want[i], "length"), rid
    served = collections.Counter(trace(url, rid)["attempts"][-1]["decode_worker"].split("#")[0]
                                 for rid, *_ in done)  # fmt: skip
    assert served["decode-2"] > 0  # the new worker took requests
    status = requests.get(f"{url}/v1/status", timeout=10).json()
    assert [w["name"] for w in status["workers"] if w["pool"] == "decode"] == ["decode-0"]
    for pool in ("prefill", "decode"):
        deadline = time.monotonic() + 30
        while metric(url, "tandem_kv_blocks_used", pool=pool) != 0:
            assert time.monotonic() < deadline, pool
            time.sleep(0.2)
