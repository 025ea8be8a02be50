"""What OpenAI-API users reach for, through one real disaggregated server (configs/local.yaml
with n-gram speculation on the decode worker; KV over NIXL; the official ``openai`` client):
structured output across the prefill/decode hand-off (equal to the in-process engine, which
runs the colocated code path without speculation), echo and prompt logprobs equal to the
engine's own, the tokenizer / version / model routes, stop_reason, cached_tokens, continuous
usage, chat template knobs, n > 1 choices (one prefill and one KV transfer for all of them,
counted in bytes), and clean 400s for a grammar the workers refuse and for hostile JSON."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import openai
import pytest
import requests
import yaml
from e2e_client import MODEL, complete, greedy, metric, metric_settled, run_concurrently
from server_process import serving

from core.structured_output import StructuredOutput

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
JSON_QUESTIONS = [
    "Describe a person as JSON.",
    "Alice is 31 and has a cat called Tom and a dog called Rex. Give her as JSON.",
    "Write a JSON record for a retired sailor.",
    "Make up a child with one pet, as JSON.",
]
CAPITAL = "What is the capital of France?"
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
CHOICES = ["Berlin", "Madrid", "Lisbon"]
ECHO_PROMPT = "The quick brown fox jumps over"
N_PROMPT = ("In a small harbour town, the lighthouse keeper kept a logbook of every ship that "
            "passed, every storm that broke over the cliffs, and every letter that arrived. "
            "One winter evening he wrote:")  # fmt: skip


@pytest.fixture(scope="module")
def refs(llm) -> dict:
    """The in-process engine's outputs (computed before the server starts: no CPU contest)."""
    json_ids = [llm.encode_chat(q) for q in JSON_QUESTIONS]
    capital = llm.encode_chat(CAPITAL)
    person = StructuredOutput.json_schema(PERSON)
    outs = llm.generate(
        [*json_ids, capital, capital, capital],
        [*[greedy(48, structured=person)] * len(json_ids),
         greedy(12, structured=StructuredOutput("regex", REGEX)),
         greedy(6, structured=StructuredOutput.choice(CHOICES)), greedy(1)],
    )  # fmt: skip
    (echo,) = llm.generate([ECHO_PROMPT], greedy(3, logprobs=1, prompt_logprobs=1))
    (capital_8,) = llm.generate([capital], greedy(8))
    return {"json_ids": json_ids, "json": outs[:4], "regex": outs[4], "choice": outs[5],
            "free_first": outs[6], "echo": echo, "capital_8": capital_8}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory, refs):
    tmp = tmp_path_factory.mktemp("extras")
    config = yaml.safe_load(Path("configs/local.yaml").read_text())
    config["pools"]["decode"]["speculative"] = {"method": "ngram", "num_speculative_tokens": 4}
    (tmp / "local-ngram.yaml").write_text(yaml.safe_dump(config))
    with serving(str(tmp / "local-ngram.yaml"), tmp / "server.log") as proc:
        yield proc


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_json_schema_across_the_hand_off_is_valid_and_equals_colocated(server, refs):
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    bodies = [{"prompt": ids, "max_tokens": 48, "temperature": 0,
               "response_format": response_format} for ids in refs["json_ids"]]  # fmt: skip
    results = run_concurrently(server.url, bodies)
    for (text, finish, _), ref in zip(results, refs["json"], strict=True):
        assert (text, finish) == (ref.text, "stop")
        jsonschema.validate(json.loads(text), PERSON)
    # the decode worker speculated on them (n-gram drafts, cut by the grammar)
    assert metric(server.url, "tandem_spec_draft_tokens_total", default=0) > 0


def test_regex_and_choice_hold_and_token_1_is_already_constrained(server, refs):
    client = _client(server)
    messages = [{"role": "user", "content": CAPITAL}]

    def chat(max_tokens: int, **extra) -> str:
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra
        ).choices[0].message.content

    regex = chat(12, guided_regex=REGEX)
    assert regex == refs["regex"].text and re.fullmatch(REGEX, regex)
    choice = chat(6, guided_choice=CHOICES)
    assert choice == refs["choice"].text and choice in CHOICES
    # max_tokens 1 ends at prefill (no KV moves): the prefill worker sampled it under the grammar
    first = chat(1, guided_choice=CHOICES)
    assert first and any(c.startswith(first) for c in CHOICES)
    free = refs["free_first"].text  # what the model says unconstrained
    assert free and not any(c.startswith(free) for c in CHOICES)


def test_echo_logprobs_and_prompt_logprobs_equal_the_engines(server, llm, refs):
    ref = refs["echo"]
    body = complete(server.url, prompt=ECHO_PROMPT, max_tokens=3, temperature=0, echo=True,
                    logprobs=1, prompt_logprobs=1).json()  # fmt: skip
    choice = body["choices"][0]
    assert choice["text"] == ECHO_PROMPT + ref.text
    lp = choice["logprobs"]
    ids = ref.prompt_token_ids + ref.token_ids
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in ids]
    expected = [None, *(e.logprob for e in ref.prompt_logprobs), *(e.logprob for e in ref.logprobs)]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected[1:], abs=1e-4)
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ref.prompt_token_ids)
    for entry, pos in zip(plp[1:], ref.prompt_logprobs, strict=True):
        assert entry[str(pos.token_id)]["logprob"] == pytest.approx(pos.logprob, abs=1e-4)


def test_routes_and_response_fields(server, llm):
    client = _client(server)
    url = server.url
    tok = requests.post(f"{url}/tokenize", json={"prompt": ECHO_PROMPT}, timeout=30).json()
    assert tok["tokens"] == llm.tokenizer.encode(ECHO_PROMPT) and tok["count"] == len(tok["tokens"])
    turns = [{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": "It is"}]
    chat_tok = requests.post(f"{url}/tokenize", timeout=30, json={
        "messages": turns, "continue_final_message": True}).json()  # fmt: skip
    assert chat_tok["tokens"] == llm.tokenizer.apply_chat_template(turns, False, True)
    detok = requests.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()
    assert detok == {"prompt": ECHO_PROMPT}
    assert requests.get(f"{url}/version", timeout=10).json()["version"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # continue_final_message: the answer continues "It is"
    (ref,) = llm.generate([chat_tok["tokens"]], greedy(4))
    cont = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=4,
        temperature=0, extra_body={"continue_final_message": True})  # fmt: skip
    assert cont.choices[0].message.content == ref.text
    # stop_reason; cached_tokens on a repeat (the prefill worker's prefix cache)
    messages = [{"role": "user", "content": "Count from one to ten: one, two"}]
    for _ in range(2):
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                             temperature=0, stop=[" four"])  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == " four"
    assert out.usage.prompt_tokens_details.cached_tokens >= 16  # a block at least
    chunks = list(client.completions.create(
        model=MODEL, prompt=ECHO_PROMPT, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))  # fmt: skip
    assert [c.usage.completion_tokens for c in chunks][-2:] == [4, 4]
    assert all(c.usage is not None for c in chunks)


def test_refused_grammar_and_hostile_json_get_400_and_leave_nothing_held(server):
    for stream in (False, True):
        bad = complete(server.url, prompt="Hello", max_tokens=4, guided_regex="(ab", stream=stream)
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["param"] == "guided_regex" and "parenthesis" in error["message"]
    deep = requests.post(f"{server.url}/v1/completions", data=b"[" * 5000 + b"]" * 5000,
                         headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert deep.status_code == 400 and "nested" in deep.json()["error"]["message"]
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 60
    while any(metric(server.url, "tandem_kv_blocks_used", pool=p) for p in ("prefill", "decode")):
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.25)


def _trace(url: str, request_id: str) -> dict:
    response = requests.get(f"{url}/v1/requests/{request_id}/trace", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_n_choices_share_one_prefill_and_one_transfer(server, refs):
    client = _client(server)
    url = server.url
    sent = metric_settled(url, "tandem_kv_transfer_bytes_total", 0, backend="nixl")
    hits = metric_settled(url, "tandem_prefix_hit_tokens_total", 0, pool="decode")
    num_prompt_tokens = requests.post(f"{url}/tokenize", json={"prompt": N_PROMPT},
                                      timeout=30).json()["count"]  # fmt: skip

    def sample(request_id: str) -> list[str]:
        out = client.completions.create(
            model=MODEL, prompt=N_PROMPT, max_tokens=8, temperature=1.0, n=4, seed=1234,
            extra_headers={"x-request-id": request_id})  # fmt: skip
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert out.usage.prompt_tokens == num_prompt_tokens  # once, not per choice
        assert 4 <= out.usage.completion_tokens <= 4 * 8
        return [c.text for c in out.choices]

    first = sample("nfork-a")
    assert len(set(first)) > 1  # seed + i per choice: they differ ...
    # one prompt transfer: choice 0's, into decode; the others prefilled their tail there
    traces = [_trace(url, f"cmpl-nfork-a{'+' + str(i) if i else ''}") for i in range(4)]
    (lead,) = traces[0]["attempts"]
    assert lead["where"] == "remote" and lead["transfer_bytes"] > 0
    assert (lead["kv_blocks"], lead["cached_blocks"]) == (-(-num_prompt_tokens // 16), 0)
    for t in traces[1:]:
        (fork,) = t["attempts"]
        assert (fork["where"], fork["local_reason"], fork["transfer_bytes"]) == (
            "local", "n_fork", 0)  # fmt: skip
        assert fork["decode_worker"] == lead["decode_worker"]
    moved = metric_settled(url, "tandem_kv_transfer_bytes_total", sent + lead["transfer_bytes"],
                            backend="nixl") - sent  # fmt: skip
    assert moved == lead["transfer_bytes"]  # counted by the workers: one prompt's blocks
    # ... which the three others found in decode's prefix cache (all full blocks but the last
    # one holding the prompt's last token, recomputed with the tail)
    shared = (num_prompt_tokens - 1) // 16 * 16
    assert metric_settled(url, "tandem_prefix_hit_tokens_total", hits + 3 * shared,
                           pool="decode") == hits + 3 * shared  # fmt: skip
    assert metric(url, "tandem_prefill_location_total", where="local", reason="n_fork") == 3
    assert sample("nfork-b") == first  # ... and the same seed gives the same four again

    # greedy: every choice is the in-process engine's answer (streamed, interleaved by index)
    ref = refs["capital_8"]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CAPITAL}], max_tokens=8,
        temperature=0, n=2, stream=True)  # fmt: skip
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [ref.text, ref.text]
