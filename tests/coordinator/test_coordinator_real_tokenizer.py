"""The front end with the real SmolLM2 tokenizer (``core.tokenizer`` from the builtin GGUF):
the chat template, token counts for limits and logprob token strings are the model's own."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from engine_double import ScriptedEngine, expected_ids
from serving_harness import MODEL, make_config, running_server

from coordinator.engine_client import Tokenizer as TokenizerProtocol

pytestmark = pytest.mark.slow  # building the tokenizer from the GGUF takes ~15 s on 2 cores


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from core.tokenizer import Tokenizer
    from engine.tokenizer_files import load_tokenizer_files

    return Tokenizer(load_tokenizer_files("builtin:smollm2-135m-instruct"))


async def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}{path}", json=body) as resp:
            return resp.status, await resp.json()


def test_real_tokenizer_through_the_front_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert isinstance(tok, TokenizerProtocol)
    engine = ScriptedEngine()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    config = make_config(max_model_len=64)

    async def main():
        async with running_server(config, engine, tok) as url:
            chat = await _post(
                url,
                "/v1/chat/completions",
                {"model": MODEL, "messages": messages, "max_tokens": 3, "logprobs": True},
            )
            completion = await _post(
                url, "/v1/completions", {"model": MODEL, "prompt": "Hello world", "max_tokens": 2}
            )
            too_long = await _post(
                url, "/v1/completions", {"model": MODEL, "prompt": " dog" * 64, "max_tokens": 1}
            )
            return chat, completion, too_long

    (chat_status, chat), (completion_status, completion), (long_status, long_body) = asyncio.run(
        main()
    )
    assert chat_status == 200 and completion_status == 200
    chat_ids, completion_ids = engine.requests[0][1], engine.requests[1][1]
    assert chat_ids == tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.decode(chat_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert completion_ids == tok.encode("Hello world")
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    # Logprob token strings are the model's own pieces of the generated ids.
    generated = expected_ids(chat_ids, 3)
    pieces = [entry["token"] for entry in chat["choices"][0]["logprobs"]["content"]]
    assert pieces == [tok.decode([i]) for i in generated]
    # The prompt limit counts real tokens: " dog" is one token, 64 of them exceed 63.
    assert len(tok.encode(" dog" * 64)) > config.max_prompt_tokens
    assert long_status == 400 and long_body["error"]["code"] == "context_length_exceeded"
