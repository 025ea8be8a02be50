"""One streamed request to an OpenAI-compatible server, timed as vLLM's ``bench serve`` times it
(vllm/benchmarks/lib/endpoint_request_func.py).

A *token chunk* is an SSE event with a choice: for completions every such event, for chat every
event but the opening one that only announces the assistant role. TTFT is taken at the first
token chunk, an ITL value at each later one, E2E at the last one. The output token count is the
server's ``usage.completion_tokens`` (``stream_options.include_usage``); a server that sends no
usage gets one token per token chunk.
"""

from __future__ import annotations

import json
import os
import time

import aiohttp

from bench.serving_metrics import RequestResult
from bench.workloads import RequestSpec


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def request_body(model: str, spec: RequestSpec) -> dict:
    return {
        "model": model,
        **spec.payload,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _is_token_chunk(choice: dict) -> bool:
    delta = choice.get("delta")
    if delta is None:  # completions
        return True
    return "role" not in delta or bool(delta.get("content"))


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    endpoint: str,
    model: str,
    spec: RequestSpec,
    headers: dict[str, str],
    run_start: float,
) -> RequestResult:
    """Never raises for a failed request: the error goes into the result."""
    start = time.perf_counter()
    last = start
    ttft: float | None = None
    itls: list[float] = []
    num_chunks = 0
    usage: dict | None = None
    error: str | None = None
    try:
        async with session.post(
            f"{url}/v1/{endpoint}", json=request_body(model, spec), headers=headers
        ) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                error = f"HTTP {response.status}: {text}"
            else:
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk.replace(b"\r\n", b"\n")
                    *events, buffer = buffer.split(b"\n\n")
                    for event in events:
                        data = event.strip().removeprefix(b"data:").strip()
                        if not data or data == b"[DONE]" or data.startswith(b":"):
                            continue
                        body = json.loads(data)
                        if "error" in body:
                            error = str(body["error"].get("message", body["error"]))
                            break
                        choices = body.get("choices") or []
                        if choices and _is_token_chunk(choices[0]):
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - start
                            else:
                                itls.append(now - last)
                            last = now
                            num_chunks += 1
                        if body.get("usage"):
                            usage = body["usage"]
                    if error is not None:
                        break
                if error is None and ttft is None:
                    error = "the stream ended without a token"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return RequestResult(
        start_s=start - run_start,
        ttft_s=ttft or 0.0,
        itls_s=tuple(itls),
        latency_s=last - start,
        prompt_tokens=int(usage["prompt_tokens"]) if usage else spec.input_len,
        output_tokens=int(usage["completion_tokens"]) if usage else num_chunks,
        error=error,
    )
