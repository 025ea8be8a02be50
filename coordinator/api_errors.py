"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise ``ApiError``; one middleware turns it (and any unexpected exception) into a JSON
response, so every 4xx/5xx a client sees has the same shape the ``openai`` client parses.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
TIMEOUT = "timeout_error"
SERVER = "server_error"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, INVALID_REQUEST, param=param, code=code)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        # aiohttp's own 404/405 for unknown routes: same JSON shape as ours.
        if exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason, INVALID_REQUEST, code=str(exc.status)).response()
    except Exception as exc:  # a bug: still answer in the shape clients parse, and log it
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", SERVER).response()
