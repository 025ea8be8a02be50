"""Bad requests get OpenAI-shaped errors with the right status, ``param`` and ``code``."""

from __future__ import annotations

import asyncio

import aiohttp
import jinja2
import openai
import pytest
from engine_double import ScriptedEngine
from serving_harness import MODEL, make_config, running_server
from tokenizer_double import ByteTokenizer

TOK = ByteTokenizer()
CHAT = [{"role": "user", "content": "hi"}]


async def _post(url: str, path: str, data: bytes | dict, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        kwargs = {"data": data} if isinstance(data, bytes) else {"json": data}
        async with session.post(f"{url}{path}", headers=headers, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.json()


def _error_of(path: str, body: bytes | dict, config=None, headers=None) -> tuple[int, dict]:
    engine = ScriptedEngine()

    async def main():
        async with running_server(config or make_config(max_model_len=64), engine, TOK) as url:
            return await _post(url, path, body, headers)

    status, _, payload = asyncio.run(main())
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert engine.requests == []  # nothing invalid reaches the engine
    return status, payload["error"]


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "must be an integer"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "must be a number"),
        ({"prompt": "x", "temperature": -1}, "temperature", ">= 0"),
        ({"prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
        ({"prompt": "x", "top_k": -2}, "top_k", ">= 0"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "<= 20"),
        ({"prompt": "x", "stop": [1, 2]}, "stop", "stop must be"),
        ({"prompt": "x", "seed": 1.5}, "seed", "integer"),
        ({"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens", "<= max_tokens"),
        ({"prompt": "x", "n": 17}, "n", "n must be an integer from 1 to 16, got 17"),
        ({"prompt": "x", "n": 0}, "n", "from 1 to 16"),
        ({"prompt": "x", "n": 2.0}, "n", "from 1 to 16"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of", "only best_of=1"),
        ({"prompt": "x", "stream": "yes"}, "stream", "must be a bool"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ({"prompt": "x", "echo": "yes"}, "echo", "must be a bool"),
        ({"prompt": "x", "max_tokens": 0, "echo": False}, "max_tokens", "max_tokens must be >= 1"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": [1, -3]}, "prompt", "token ids"),
        ({"prompt": [1, 257]}, "prompt", "outside the vocabulary [0, 257)"),
        ({"prompt": ["a", "b"]}, "prompt", "batched"),
        ({"prompt": None}, "prompt", "non-empty string"),
        ({"prompt": "x" * 64}, "prompt", "more than the limit of 63"),
        ({"prompt": "x", "max_tokens": 63}, "max_tokens", "exceeds the context length of 64"),
    ],
)
def test_completions_400(body, param, fragment):
    status, error = _error_of("/v1/completions", {"model": MODEL, **body})
    assert status == 400, error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"], error


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
        ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "top_logprobs must be <= 20"),
        ({"logprobs": 1}, "logprobs", "must be a bool"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "role must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "content must be"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "text"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ],
)
def test_chat_400(body, param, fragment):
    status, error = _error_of("/v1/chat/completions", {"model": MODEL, "messages": CHAT, **body})
    assert status == 400, error
    assert error["param"] == param and fragment in error["message"], error


def test_prompt_too_long_has_openai_code():
    status, error = _error_of(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "y" * 80}]},
    )
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "messages")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_body_400(raw):
    status, error = _error_of("/v1/completions", raw)
    assert status == 400 and "JSON" in error["message"]


def test_unknown_model_404():
    status, error = _error_of("/v1/completions", {"model": "gpt-5", "prompt": "x"})
    assert status == 404
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "gpt-5" in error["message"]


def test_unknown_route_is_json_404():
    engine = ScriptedEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/v1/nothing") as resp:
                    return resp.status, await resp.json()

    status, body = asyncio.run(main())
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_api_key_401():
    config = make_config(api_key="s3cret")
    engine = ScriptedEngine()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}

    async def main():
        async with running_server(config, engine, TOK) as url:
            missing = await _post(url, "/v1/completions", body)
            wrong = await _post(url, "/v1/completions", body, {"Authorization": "Bearer nope"})
            basic = await _post(url, "/v1/completions", body, {"Authorization": "Basic s3cret"})
            good = await _post(url, "/v1/completions", body, {"Authorization": "Bearer s3cret"})
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/health") as resp:
                    health = resp.status  # probes need no key
            return missing, wrong, basic, good, health

    missing, wrong, basic, good, health = asyncio.run(main())
    for status, headers, payload in (missing, wrong, basic):
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert payload["error"]["code"] == "invalid_api_key"
    assert good[0] == 200 and health == 200
    assert len(engine.requests) == 1  # only the authorized request ran


class _AlternatingTemplate(ByteTokenizer):
    """Like many real chat templates: refuses two user turns in a row (jinja raise_exception)."""

    def apply_chat_template(self, messages, *args, **kwargs):
        roles = [m["role"] for m in messages]
        if any(a == b == "user" for a, b in zip(roles, roles[1:], strict=False)):
            raise jinja2.exceptions.TemplateError("Conversation roles must alternate")
        return super().apply_chat_template(messages, *args, **kwargs)


def test_chat_template_refusal_is_400():
    engine = ScriptedEngine()
    body = {"model": MODEL, "messages": CHAT * 2}

    async def main():
        async with running_server(make_config(), engine, _AlternatingTemplate()) as url:
            return await _post(url, "/v1/chat/completions", body)

    status, _, payload = asyncio.run(main())
    assert status == 400 and payload["error"]["param"] == "messages"
    assert "roles must alternate" in payload["error"]["message"]
