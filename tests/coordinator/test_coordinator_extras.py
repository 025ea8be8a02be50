"""The OpenAI / vLLM extras through the front end (engine double, byte tokenizer): structured
output fields, unknown fields, hostile JSON, echo and prompt logprobs, stop_reason,
cached_tokens, continuous usage, chat template knobs and the tokenizer / version / model routes.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from engine_double import ScriptedEngine, expected_ids, expected_logprob, expected_prompt_logprob
from serving_harness import MODEL, make_config, running_server
from tokenizer_double import BOS_ID, ByteTokenizer

from core.structured_output import StructuredOutput

TOK = ByteTokenizer()
CHAT = [{"role": "user", "content": "hi"}]


async def _call(url: str, method: str, path: str, body=None, headers=None):
    async with aiohttp.ClientSession() as session:
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with session.request(method, f"{url}{path}", headers=headers, **kwargs) as resp:
            raw = await resp.read()
            return resp.status, raw


def _serve(calls, engine=None, config=None):
    """Run ``calls(url)`` (a coroutine function) against a server; returns its result."""
    engine = engine or ScriptedEngine()

    async def main():
        async with running_server(config or make_config(), engine, TOK) as url:
            return await calls(url)

    return asyncio.run(main())


def _post(path: str, body, engine=None, config=None) -> tuple[int, dict]:
    async def calls(url):
        status, raw = await _call(url, "POST", path, body)
        return status, json.loads(raw)

    return _serve(calls, engine, config)


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


# -- fields ------------------------------------------------------------------------------------


def test_unknown_fields_are_400_naming_them_and_no_ops_are_accepted():
    engine = ScriptedEngine()
    status, body = _post(
        "/v1/completions", {"model": MODEL, "prompt": "x", "frobnicate": 1, "best_effort": True},
        engine,
    )  # fmt: skip
    assert status == 400 and body["error"]["param"] == "best_effort"
    assert "best_effort, frobnicate" in body["error"]["message"]
    no_ops = {"user": "u1", "metadata": {"k": "v"}, "service_tier": "auto", "store": False,
              "n": 1, "logit_bias": {}, "tools": [], "tool_choice": "none", "best_of": None,
              "parallel_tool_calls": True, "guided_decoding_backend": "xgrammar"}  # fmt: skip
    status, body = _post(
        "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2, **no_ops},
        engine,
    )  # fmt: skip
    assert status == 200, body
    assert len(engine.requests) == 1
    for field, value in [("tool_choice", "required"), ("n", True), ("priority", 3),
                         ("modalities", ["text", "audio"]), ("echo", 1)]:  # fmt: skip
        status, body = _post("/v1/chat/completions",
                             {"model": MODEL, "messages": CHAT, field: value})  # fmt: skip
        assert (status, body["error"]["param"]) == (400, field), body
    status, body = _post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "prompt": "x"})
    assert (status, body["error"]["param"]) == (400, "prompt")  # a completions-only field


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5000 + b"]" * 5000,  # past Python's recursion limit: was a 500
        json.dumps({"prompt": "x", "metadata": {"a": [[[[[[[[[[1]]]]]]]]]] * 3}}).encode()
        .replace(b"[1]", b"[" * 60 + b"1" + b"]" * 60),  # parses, but 70 deep
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # int over 4300 digits
    ],
    ids=["5000-deep", "70-deep", "huge-int"],
)
def test_hostile_json_is_400(raw):
    status, body = _post("/v1/completions", raw)
    assert status == 400, body
    assert "not valid JSON" in body["error"]["message"]


def test_json_nested_within_the_limit_is_accepted():
    schema: dict = {"type": "string"}
    for _ in range(20):  # 20 levels of schema: ~40 nested objects
        schema = {"type": "object", "properties": {"a": schema}}
    engine = ScriptedEngine()
    status, body = _post("/v1/completions",
                         {"model": MODEL, "prompt": "x", "max_tokens": 2, "guided_json": schema},
                         engine)  # fmt: skip
    assert status == 200, body
    assert engine.requests[0][2].structured == StructuredOutput.json_schema(schema)


# -- structured output -------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
         StructuredOutput.json_schema(SCHEMA)),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "n", "schema": SCHEMA, "strict": False}}},
         StructuredOutput.json_schema(SCHEMA, strict=False)),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredOutput.json_schema(SCHEMA)),
        ({"guided_regex": "[0-9]+"}, StructuredOutput("regex", "[0-9]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutput.choice(["yes", "no"])),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"')),
        ({"structured_outputs": {"regex": "a+", "disable_any_whitespace": True}},
         StructuredOutput("regex", "a+")),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object")),
    ],
)  # fmt: skip
def test_structured_fields_reach_the_engine(fields, expected):
    engine = ScriptedEngine()
    status, body = _post("/v1/chat/completions",
                         {"model": MODEL, "messages": CHAT, "max_tokens": 2, **fields},
                         engine)  # fmt: skip
    assert status == 200, body
    assert engine.requests[0][2].structured == expected


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_choice": ["a", 1]}, "guided_choice", "strings"),
        ({"guided_json": "{not json"}, "guided_json", "JSON schema"),
        ({"guided_json": [1]}, "guided_json", "JSON schema"),
        ({"guided_regex": ""}, "guided_regex", "non-empty string"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
         "response_format", "unknown field x"),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
         "exactly one"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "unsupported"),
        ({"guided_decoding_backend": "outlines", "guided_regex": "a"},
         "guided_decoding_backend", "xgrammar"),
    ],
)  # fmt: skip
def test_structured_field_shapes_are_400(fields, param, fragment):
    status, body = _post("/v1/completions", {"model": MODEL, "prompt": "x", **fields})
    assert status == 400, body
    assert body["error"]["param"] == param and fragment in body["error"]["message"], body


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_the_worker_refuses_is_a_400_streamed_or_not(stream):
    engine = ScriptedEngine(reject_structured="invalid regex for structured output: bad (")
    status, body = _post("/v1/completions",
                         {"model": MODEL, "prompt": "x", "guided_regex": "(", "stream": stream},
                         engine)  # fmt: skip
    assert status == 400, body
    assert body["error"]["param"] == "guided_regex"
    assert body["error"]["message"] == "invalid regex for structured output: bad ("


def test_openai_client_response_format_json_schema():
    engine = ScriptedEngine()

    async def calls(url):
        return await _client(url).chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=3,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
        )  # fmt: skip

    out = _serve(calls, engine)
    assert out.choices[0].finish_reason == "length"
    assert engine.requests[0][2].structured == StructuredOutput.json_schema(SCHEMA)


# -- echo, prompt logprobs, stop_reason, cached tokens, usage ----------------------------------


def test_echo_with_logprobs_returns_the_prompt_tokens_first():
    prompt_ids = [BOS_ID, *b"ab"]

    async def calls(url):
        client = _client(url)
        whole = await client.completions.create(
            model=MODEL, prompt="ab", max_tokens=2, echo=True, logprobs=1
        )
        only_prompt = await client.completions.create(
            model=MODEL, prompt="ab", max_tokens=0, echo=True, logprobs=0
        )
        stream = await client.completions.create(
            model=MODEL, prompt="ab", max_tokens=2, echo=True, logprobs=1, stream=True
        )
        return whole, only_prompt, [c async for c in stream]

    whole, only_prompt, chunks = _serve(calls)
    out = expected_ids(prompt_ids, 2)
    assert whole.choices[0].text == "ab" + bytes(out).decode()
    lp = whole.choices[0].logprobs
    assert lp.tokens == ["", "a", "b", *map(chr, out)]  # BOS decodes to ""
    assert lp.token_logprobs == [None, expected_prompt_logprob(1), expected_prompt_logprob(2),
                                 expected_logprob(0), expected_logprob(1)]  # fmt: skip
    assert lp.top_logprobs[0] is None and lp.top_logprobs[1] == {"a": expected_prompt_logprob(1)}
    assert lp.text_offset == [0, 0, 1, 2, 3]
    assert whole.usage.completion_tokens == 2
    # max_tokens 0: the prompt scored, nothing generated (the engine's one token is not shown)
    assert only_prompt.choices[0].text == "ab"
    assert only_prompt.choices[0].logprobs.tokens == ["", "a", "b"]
    assert only_prompt.choices[0].finish_reason == "length"
    assert only_prompt.usage.completion_tokens == 0
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[0].choices[0].logprobs.tokens == ["", "a", "b", chr(out[0])]


def test_prompt_logprobs_field_on_completions_and_chat():
    async def calls(url):
        completion = await _call(url, "POST", "/v1/completions", {
            "model": MODEL, "prompt": "ab", "max_tokens": 1, "prompt_logprobs": 2})
        chat = await _call(url, "POST", "/v1/chat/completions", {
            "model": MODEL, "messages": CHAT, "max_tokens": 1, "prompt_logprobs": 0})
        return json.loads(completion[1]), json.loads(chat[1])  # fmt: skip

    completion, chat = _serve(calls)
    plp = completion["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == 3
    assert plp[1] == {
        str(ord("a")): {"logprob": expected_prompt_logprob(1), "rank": 1, "decoded_token": "a"},
        str(ord("B")): {"logprob": expected_prompt_logprob(1, 1), "rank": 2, "decoded_token": "B"},
    }
    assert len(chat["prompt_logprobs"]) == len(TOK.apply_chat_template(CHAT))
    assert chat["prompt_logprobs"][1] == {
        str(ord("<")): {"logprob": expected_prompt_logprob(1), "rank": None, "decoded_token": "<"}
    }


def test_stop_reason_cached_tokens_and_continuous_usage():
    engine = ScriptedEngine(eos_after=3, stop_reason=7, cached_tokens=4)

    async def calls(url):
        client = _client(url)
        whole = await _call(url, "POST", "/v1/completions",
                            {"model": MODEL, "prompt": "hello", "max_tokens": 9})
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=9, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
        return json.loads(whole[1]), [c async for c in stream]  # fmt: skip

    whole, chunks = _serve(calls, engine)
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["choices"][0]["stop_reason"] == 7
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert [c.usage.completion_tokens for c in chunks] == [0, 1, 2, 3, 3]  # role .. final usage
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4
    assert chunks[-2].choices[0].model_extra["stop_reason"] == 7


# -- chat template knobs -----------------------------------------------------------------------


def test_chat_template_knobs_reach_the_template():
    engine = ScriptedEngine()
    turns = [*CHAT, {"role": "assistant", "content": "The answer is"}]

    async def calls(url):
        client = _client(url)
        await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
            extra_body={"chat_template_kwargs": {"system_note": "terse"},
                        "add_generation_prompt": False})  # fmt: skip
        echoed = await client.chat.completions.create(model=MODEL, messages=turns, max_tokens=2,
            extra_body={"continue_final_message": True, "echo": True})  # fmt: skip
        return echoed

    echoed = _serve(calls, engine)
    assert engine.requests[0][1] == TOK.encode("[terse]<|user|>hi\n")
    assert engine.requests[1][1] == TOK.encode("<|user|>hi\n<|assistant|>The answer is")
    generated = bytes(expected_ids(engine.requests[1][1], 2)).decode()
    assert echoed.choices[0].message.content == "The answer is" + generated
    for fields, param in [
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"add_special_tokens": True}, "add_special_tokens"),
    ]:
        status, body = _post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, **fields})
        assert (status, body["error"]["param"]) == (400, param), body


# -- routes ------------------------------------------------------------------------------------


def test_tokenize_detokenize_version_and_model_routes():
    async def calls(url):
        return [
            await _call(url, "POST", "/tokenize", {"model": MODEL, "prompt": "hé"}),
            await _call(url, "POST", "/tokenize",
                        {"prompt": "ab", "add_special_tokens": False, "return_token_strs": True}),
            await _call(url, "POST", "/tokenize",
                        {"messages": CHAT, "add_generation_prompt": False}),
            await _call(url, "POST", "/detokenize", {"tokens": [BOS_ID, 104, 105]}),
            await _call(url, "POST", "/detokenize", {"tokens": [104, 9999]}),
            await _call(url, "POST", "/tokenize", {"prompt": "x", "model": "other"}),
            await _call(url, "POST", "/tokenize", {"prompt": "x", "extra": 1}),
            await _call(url, "GET", "/version"),
            await _call(url, "GET", f"/v1/models/{MODEL}"),
            await _call(url, "GET", "/v1/models/org/other-model"),
        ]  # fmt: skip

    results = [(status, json.loads(raw)) for status, raw in _serve(calls)]
    (s1, tok), (s2, strs), (s3, chat), (s4, detok), (s5, bad) = results[:5]
    (s6, other), (s7, extra) = results[5:7]
    assert (s1, tok) == (200, {"count": 4, "max_model_len": 256,
                               "tokens": [BOS_ID, *"hé".encode()], "token_strs": None})  # fmt: skip
    assert (s2, strs["tokens"], strs["token_strs"]) == (200, [97, 98], ["a", "b"])
    assert (s3, chat["tokens"]) == (200, TOK.apply_chat_template(CHAT, False))
    assert (s4, detok) == (200, {"prompt": "hi"})
    assert (s5, bad["error"]["param"]) == (400, "tokens") and "9999" in bad["error"]["message"]
    assert (s6, other["error"]["code"]) == (404, "model_not_found")
    assert (s7, extra["error"]["param"]) == (400, "extra")
    (s8, version), (s9, card), (s10, missing) = results[7:]
    assert s8 == 200 and version["version"] == "0.1.0"
    assert s9 == 200 and card["id"] == MODEL and card["object"] == "model"
    assert (s10, missing["error"]["code"]) == (404, "model_not_found")


def test_tokenizer_routes_need_the_key_version_does_not():
    async def calls(url):
        key = {"Authorization": "Bearer k"}
        return [
            (await _call(url, "POST", "/tokenize", {"prompt": "x"}))[0],
            (await _call(url, "POST", "/detokenize", {"tokens": [1]}))[0],
            (await _call(url, "POST", "/tokenize", {"prompt": "x"}, key))[0],
            (await _call(url, "GET", "/version"))[0],
            (await _call(url, "GET", f"/v1/models/{MODEL}"))[0],
        ]

    assert _serve(calls, config=make_config(api_key="k")) == [401, 401, 200, 200, 401]
