"""Write one generation's deltas to the client: as one JSON body, or as SSE events.

With n > 1 choices the stream interleaves the choices' chunks, each naming its ``index``; any
choice's failure fails the request (the others are aborted by ``RequestRun.close``).

Both return ``(response, outcome)`` where outcome is the finish reason, "timeout", "error" or
"disconnect" (for metrics). Engine failures become OpenAI-shaped errors: an HTTP status when the
body is not sent yet, an in-band ``data: {"error": ...}`` event followed by ``data: [DONE]``
once a stream has started. With structured output a stream's status line waits for the first
delta: a grammar the workers refuse ends the request before any token, and that is a real 400
(any other failure before the first token then gets its HTTP status too). Other streams start at
once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from coordinator.api_errors import SERVER, TIMEOUT, ApiError, bad_request
from coordinator.openai_responses import ResponseBuilder
from coordinator.request_run import RequestRun, RequestTimeout
from core.outputs import FAILURES, FINISH_ABORT, FINISH_REJECTED, OutputDelta

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell reverse proxies not to buffer the stream
}


def _failure(delta: OutputDelta, builder: ResponseBuilder) -> ApiError | None:
    if delta.error is None and delta.finish_reason not in FAILURES:
        return None
    if delta.finish_reason == FINISH_REJECTED:  # the request's own input (its grammar)
        message = delta.error or "the request was rejected"
        return bad_request(message, param=builder.request.structured_param)
    if delta.finish_reason == FINISH_ABORT and delta.error is None:
        return ApiError(503, "the request was aborted by the engine", SERVER, code="aborted")
    if delta.fault is not None:  # the system failed it, and retries did not help (yet)
        return ApiError(503, f"engine unavailable: {delta.error}", SERVER, code=delta.fault)
    return ApiError(500, f"engine error: {delta.error or 'unknown'}", SERVER, code="engine_error")


def _unfinished() -> ApiError:
    return ApiError(500, "the engine ended the request without finishing it", SERVER)


def _api_error(exc: Exception, run: RequestRun) -> ApiError:
    """What an exception out of a request run means for the client (call it in the handler:
    an unexpected one is logged with its traceback)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), TIMEOUT, code="timeout")
    log.exception("engine failed on %s", run.request_id)
    return ApiError(500, f"engine error: {exc!r}", SERVER, code="engine_error")


async def collect_response(run: RequestRun, builder: ResponseBuilder) -> tuple[web.Response, str]:
    try:
        async for index, delta in run:
            failure = _failure(delta, builder)
            if failure is not None:
                raise failure
            builder.add(index, delta)
    except Exception as exc:
        raise _api_error(exc, run) from None
    if not run.finished:
        raise _unfinished()
    return web.json_response(builder.final()), builder.finish_reason or "stop"


async def stream_response(
    request: web.Request, run: RequestRun, builder: ResponseBuilder
) -> tuple[web.StreamResponse, str]:
    first = None
    if builder.request.structured_param is not None:
        first = await _first_delta(run, builder)  # raises ApiError: no 200 sent yet
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    outcome = "error"
    try:
        for role in builder.role_chunks():
            await send(role)
        try:
            async for index, delta in _chain(first, run):
                failure = _failure(delta, builder)
                if failure is not None:
                    await send(failure.body())
                    break
                builder.add(index, delta)
                await send(builder.chunk(index, delta))
            else:
                if run.finished:
                    outcome = builder.finish_reason or "stop"
                    if builder.request.include_usage:
                        await send(builder.usage_chunk())
                else:
                    await send(_unfinished().body())
        except ConnectionError:
            raise
        except Exception as exc:
            if isinstance(exc, RequestTimeout):
                outcome = "timeout"
            await send(_api_error(exc, run).body())
        await send("[DONE]")
        await response.write_eof()
    except ConnectionError:
        # The client went away mid-write; the caller's finally aborts the request.
        outcome = "disconnect"
    return response, outcome


async def _first_delta(run: RequestRun, builder: ResponseBuilder) -> tuple[int, OutputDelta]:
    """The first delta, or the error it means (before any byte of the stream is sent)."""
    try:
        delta = await anext(run, None)
    except Exception as exc:
        raise _api_error(exc, run) from None
    if delta is None:
        raise _unfinished()
    failure = _failure(delta[1], builder)
    if failure is not None:
        raise failure
    return delta


async def _chain(
    first: tuple[int, OutputDelta] | None, run: RequestRun
) -> AsyncIterator[tuple[int, OutputDelta]]:
    if first is not None:
        yield first
    async for item in run:
        yield item
