"""n > 1 through the front end (engine double, byte tokenizer, the official client): one engine
request per choice (choice 0 by the request id, choice i as ``<id>+<i>`` with ``fork_of`` choice
0), seed + i per choice, the prompt's logprobs computed by choice 0 only and repeated per
choice, usage counting the prompt once, streamed chunks naming their choice (choice 0 speaks
first), and a failing choice failing the request with every sibling aborted."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
from engine_double import ScriptedEngine, expected_ids, expected_prompt_logprob
from serving_harness import MODEL, make_config, running_server
from tokenizer_double import BOS_ID, ByteTokenizer

from coordinator.request_run import choice_id
from coordinator.request_state import RequestRecord
from core.outputs import OutputDelta
from core.sampling_params import SamplingParams

TOK = ByteTokenizer()


def _text(prompt_ids: list[int], n: int) -> str:
    return bytes(expected_ids(prompt_ids, n)).decode()


def _serve(calls, engine: ScriptedEngine):
    async def main():
        async with running_server(make_config(), engine, TOK) as url:
            return await calls(url)

    return asyncio.run(main())


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_n_choices_each_an_engine_request_with_its_seed_and_shared_prompt_parts():
    engine = ScriptedEngine(cached_tokens=3)
    prompt = [BOS_ID, *b"abc"]

    async def calls(url):
        return await _client(url).completions.create(
            model=MODEL, prompt="abc", max_tokens=4, n=3, seed=7, echo=True, logprobs=1,
            extra_body={"prompt_logprobs": 1}, extra_headers={"x-request-id": "many"},
        )  # fmt: skip

    out = _serve(calls, engine)
    assert [c.index for c in out.choices] == [0, 1, 2]
    expected = "abc" + _text(prompt, 4)  # the double ignores the seed: equal texts
    assert [c.text for c in out.choices] == [expected] * 3
    assert [c.finish_reason for c in out.choices] == ["length"] * 3
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 12, 16)
    assert usage.prompt_tokens_details.cached_tokens == 3  # choice 0's prompt, counted once
    ids = [rid for rid, _, _ in engine.requests]
    assert ids == ["cmpl-many", "cmpl-many+1", "cmpl-many+2"] == [
        choice_id("cmpl-many", i) for i in range(3)]  # fmt: skip
    assert engine.forks == {"cmpl-many+1": "cmpl-many", "cmpl-many+2": "cmpl-many"}
    params = [p for _, _, p in engine.requests]
    assert [p.seed for p in params] == [7, 8, 9]
    assert [p.prompt_logprobs for p in params] == [1, None, None]  # choice 0 computes them
    for c in out.choices:  # ... and every choice shows them: echo + logprobs, prompt_logprobs
        lp = c.logprobs
        assert lp.tokens[1:4] == ["a", "b", "c"] and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:4] == [expected_prompt_logprob(i) for i in (1, 2, 3)]
        assert lp.text_offset == out.choices[0].logprobs.text_offset  # per choice, from 0
        plp = c.model_extra["prompt_logprobs"]
        assert plp[0] is None and len(plp) == 4


def test_unseeded_choices_stay_unseeded_and_n_1_is_unchanged():
    engine = ScriptedEngine()

    async def calls(url):
        client = _client(url)
        await client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
        return await client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=1)

    single = _serve(calls, engine)
    assert [p.seed for _, _, p in engine.requests] == [None, None, None]
    assert len(engine.forks) == 1 and len(single.choices) == 1
    assert not engine.requests[-1][0].endswith("+1")


class _LateFirstChoice(ScriptedEngine):
    """Choice 0 starts late: its siblings' deltas come first and must be held back."""

    async def generate(self, request_id, prompt_token_ids, params, fork_of=None):
        if fork_of is None:
            await asyncio.sleep(0.1)
        async for delta in super().generate(request_id, prompt_token_ids, params, fork_of):
            yield delta


def test_streamed_choices_interleave_with_their_index_and_choice_0_speaks_first():
    engine = _LateFirstChoice(token_delay_s=0.005)
    prompt = TOK.apply_chat_template([{"role": "user", "content": "hi"}])

    async def calls(url):
        stream = await _client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=3,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        return [chunk async for chunk in stream]

    chunks = _serve(calls, engine)
    roles = chunks[:3]
    assert [c.choices[0].index for c in roles] == [0, 1, 2]
    assert all(c.choices[0].delta.role == "assistant" for c in roles)
    content = [c for c in chunks[3:] if c.choices]
    assert content[0].choices[0].index == 0  # it carries the shared prompt parts
    assert all(len(c.choices) == 1 for c in content)
    texts, finishes = ["", "", ""], [None, None, None]
    for c in content:
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [_text(prompt, 3)] * 3 and finishes == ["length"] * 3
    indices = [c.choices[0].index for c in content]
    assert indices != sorted(indices)  # interleaved, not one choice after the other
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


class _FailingFork(ScriptedEngine):
    """Choice 1 fails after its first token; the others would run much longer."""

    async def generate(self, request_id, prompt_token_ids, params, fork_of=None):
        async for delta in super().generate(request_id, prompt_token_ids, params, fork_of):
            yield delta
            if request_id.endswith("+1"):
                yield OutputDelta(request_id, (), finish_reason="error", error="worker died",
                                  fault="worker_died")  # fmt: skip
                return


def test_a_failing_choice_fails_the_request_and_aborts_its_siblings():
    for stream in (False, True):
        engine = _FailingFork(token_delay_s=0.01)

        async def calls(url, stream=stream):
            body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "n": 3, "stream": stream}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    return resp.status, await resp.text()

        status, raw = _serve(calls, engine)
        if stream:
            assert status == 200
            events = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
            assert events[-1]["error"]["code"] == "worker_died" and raw.endswith("[DONE]\n\n")
        else:
            assert status == 503 and json.loads(raw)["error"]["code"] == "worker_died"
        ids = [rid for rid, _, _ in engine.requests]
        assert sorted(engine.aborted) == [ids[0], ids[2]]  # the unfinished siblings
        assert not engine.finished


def test_attempt_records_why_it_prefilled_locally_and_forks_wait_for_kv_ready():
    rec = RequestRecord("r", (1, 2), SamplingParams())
    assert rec.new_attempt(()).local_why is None  # placed by the router later
    worker = object()
    assert rec.new_attempt((), local_on=worker, local_why="n_fork").local_why == "n_fork"
    assert rec.new_attempt((), local_on=worker).local_why == "recompute"
    assert not rec.kv_ready.is_set() and rec.kv_on is None


def test_a_timeout_aborts_every_choice():
    engine = ScriptedEngine(token_delay_s=0.2)

    async def main():
        config = make_config(request_timeout_s=0.3)
        async with running_server(config, engine, TOK) as url:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "n": 3}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    return resp.status, await resp.json()

    status, body = asyncio.run(main())
    assert status == 504 and body["error"]["code"] == "timeout"
    assert sorted(engine.aborted) == sorted(rid for rid, _, _ in engine.requests)
    assert len(engine.aborted) == 3 and not engine.finished
