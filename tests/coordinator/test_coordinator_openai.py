"""The front end through the official ``openai`` client and raw SSE: shapes, params, usage."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
from engine_double import ScriptedEngine, expected_ids, expected_logprob
from serving_harness import MODEL, make_config, running_server
from tokenizer_double import BOS_ID, ByteTokenizer

from core.sampling_params import SamplingParams

TOK = ByteTokenizer()


def _client(url: str, api_key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def _text(prompt_ids: list[int], n: int) -> str:
    return bytes(expected_ids(prompt_ids, n)).decode()


def test_completion_non_streaming():
    engine = ScriptedEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            client = _client(url)
            out = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
            models = await client.models.list()
            return out, models

    out, models = asyncio.run(main())
    prompt_ids = [BOS_ID, *b"Hello"]
    assert out.choices[0].text == _text(prompt_ids, 5)
    assert out.choices[0].finish_reason == "length"
    assert out.id.startswith("cmpl-") and out.model == MODEL
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        6,
        5,
        11,
    )
    assert engine.requests[0][1] == prompt_ids
    assert [m.id for m in models.data] == [MODEL]
    assert engine.aborted == []  # finished normally: nothing to abort


def test_completion_token_id_prompt_and_default_max_tokens():
    engine = ScriptedEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            return await _client(url).completions.create(model=MODEL, prompt=[5, 6, 7])

    out = asyncio.run(main())
    assert engine.requests[0][1] == [5, 6, 7]
    assert engine.requests[0][2].max_tokens == 16  # OpenAI's completions default
    assert out.choices[0].text == _text([5, 6, 7], 16)


def test_sampling_params_reach_the_engine_exactly():
    engine = ScriptedEngine(eos_after=3)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            return await _client(url).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_completion_tokens=9,
                temperature=0.5,
                top_p=0.9,
                seed=1234,
                stop=["xy", "z"],
                presence_penalty=0.5,
                extra_body={"top_k": -1, "min_tokens": 2, "ignore_eos": True, "min_p": 0.1},
            )

    out = asyncio.run(main())
    params = engine.requests[0][2]
    assert params == SamplingParams(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        seed=1234,
        stop=("xy", "z"),
        presence_penalty=0.5,
        top_k=0,
        min_tokens=2,
        ignore_eos=True,
        min_p=0.1,
    )
    assert out.choices[0].finish_reason == "length"  # ignore_eos: the double ran to max_tokens
    assert engine.requests[0][1] == TOK.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_finish_reason_stop_and_default_max_tokens():
    engine = ScriptedEngine(eos_after=4)

    async def main():
        async with running_server(make_config(max_model_len=128), engine, TOK) as url:
            return await _client(url).chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            )

    out = asyncio.run(main())
    prompt_ids = engine.requests[0][1]
    assert engine.requests[0][2].max_tokens == 128 - len(prompt_ids)  # the rest of the context
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _text(prompt_ids, 4)
    assert out.usage.completion_tokens == 4


def test_chat_streaming_with_include_usage():
    engine = ScriptedEngine(tokens_per_delta=2)

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            stream = await _client(url).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": [{"type": "text", "text": "stream me"}]}],
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    prompt_ids = engine.requests[0][1]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == _text(prompt_ids, 7)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert len(chunks) == 1 + 4 + 1  # role, ceil(7 / 2) deltas, usage
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == 7


def test_completion_logprobs():
    engine = ScriptedEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            return await _client(url).completions.create(
                model=MODEL, prompt="ab", max_tokens=3, logprobs=2
            )

    out = asyncio.run(main())
    assert engine.requests[0][2].logprobs == 2
    ids = expected_ids([BOS_ID, *b"ab"], 3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [chr(i) for i in ids]
    assert lp.token_logprobs == [expected_logprob(i) for i in range(3)]
    assert lp.top_logprobs == [
        {chr(ids[i]): expected_logprob(i), "B": expected_logprob(i, 1)} for i in range(3)
    ]
    assert lp.text_offset == [0, 1, 2]


def test_chat_logprobs_streamed():
    engine = ScriptedEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            stream = await _client(url).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=2,
                logprobs=True,
                top_logprobs=1,
                stream=True,
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    entries = [e for c in chunks[1:] for e in c.choices[0].logprobs.content]
    ids = expected_ids(engine.requests[0][1], 2)
    assert [e.token for e in entries] == [chr(i) for i in ids]
    assert [e.logprob for e in entries] == [expected_logprob(0), expected_logprob(1)]
    assert [e.bytes for e in entries] == [[i] for i in ids]
    assert [[t.token for t in e.top_logprobs] for e in entries] == [[chr(i)] for i in ids]


def test_sse_framing_raw():
    """Every event is ``data: <json>\\n\\n``; the stream ends with ``data: [DONE]``."""
    engine = ScriptedEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "hey", "max_tokens": 3, "stream": True}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    return resp.status, resp.headers["Content-Type"], await resp.read()

    status, content_type, raw = asyncio.run(main())
    assert status == 200 and content_type.startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert [p["object"] for p in payloads] == ["text_completion"] * 3
    assert "".join(p["choices"][0]["text"] for p in payloads) == _text([BOS_ID, *b"hey"], 3)
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, "length"]
    assert "usage" not in payloads[-1]  # not asked for


class _CoroutineEngine(ScriptedEngine):
    """An engine whose generate is a coroutine returning the iterator (also allowed)."""

    async def generate(self, request_id, prompt_token_ids, params):  # type: ignore[override]
        await asyncio.sleep(0)
        return super().generate(request_id, prompt_token_ids, params)


def test_engine_generate_may_be_a_coroutine():
    engine = _CoroutineEngine()

    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            stream = await _client(url).completions.create(
                model=MODEL, prompt="co", max_tokens=3, stream=True
            )
            return "".join([chunk.choices[0].text async for chunk in stream])

    assert asyncio.run(main()) == _text([BOS_ID, *b"co"], 3)
