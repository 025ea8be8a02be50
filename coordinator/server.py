"""The coordinator's HTTP front end: OpenAI-compatible completions and chat, with SSE streaming.

    build_app(config, engine, tokenizer) -> web.Application   # routes, middlewares, state
    start_server(app, host, port) -> web.AppRunner            # bound and listening (port 0: any)
    serve(config, engine, tokenizer)                          # runs until cancelled

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /v1/requests/{id}/trace, POST /tokenize, POST /detokenize, GET /version, GET /health,
POST /admin/pools/{pool}/replicas (live scaling),
GET /metrics, the status page (``coordinator.status``: GET / and /status, polling
GET /v1/status), and with TANDEM_FAULT_INJECTION=1 only (tests) POST /admin/faults. /v1/*,
/admin/*, /tokenize and /detokenize require the API key (probes, scrapers, /version and the
page's static files stay unauthenticated). Every response carries ``x-request-id``: the client's
own if it sent one (a generation is then ``cmpl-<that id>`` everywhere), else a generation's
request id (``cmpl-...`` / ``chatcmpl-...``), else a fresh ``req-...`` id. With ``n`` > 1,
choice i > 0 runs in the engine as ``<request id>+<i>`` (its own trace; request_run.py).

The server runs with ``handler_cancellation=True``: when a client disconnects, aiohttp cancels
its handler, and ``RequestRun.close()`` in the handler's ``finally`` aborts the request in the
engine, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from coordinator.api_errors import (
    AUTHENTICATION,
    NOT_FOUND,
    RATE_LIMIT,
    TIMEOUT,
    ApiError,
    bad_request,
    error_middleware,
)
from coordinator.engine_client import EngineClient, PoolHealth, Tokenizer
from coordinator.json_body import json_body
from coordinator.metrics import CONTENT_TYPE, ServerMetrics
from coordinator.openai_requests import (
    ServingLimits,
    model_not_found,
    parse_chat,
    parse_completion,
)
from coordinator.openai_responses import ResponseBuilder
from coordinator.request_run import RequestRun
from coordinator.response_writer import collect_response, stream_response
from coordinator.status import RecentTraces, StatusBoard, add_status_routes
from coordinator.tokenize_api import detokenize, tokenize
from core.config import TandemConfig

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024  # a 100k-token prompt as a JSON id list fits easily
HEALTH_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 5.0  # in-flight handlers get this long to finish once the server stops
RETRY_AFTER_S = 1
FAULT_INJECTION_ENV = "TANDEM_FAULT_INJECTION"  # engine/faults.py ENV_FLAG (no torch here)
KEYED_PATHS = ("/tokenize", "/detokenize")  # besides /v1/* and /admin/*


@dataclass
class ServerState:
    """Mutable per-server state (one per app, so several servers can share a process)."""

    config: TandemConfig
    engine: EngineClient
    tokenizer: Tokenizer
    metrics: ServerMetrics
    limits: ServingLimits
    created: int
    num_in_flight: int = 0
    request_ids: set[str] = field(default_factory=set)  # of the generations in flight


STATE = web.AppKey("tandem_state", ServerState)
REQUEST_ID = web.RequestKey("tandem_request_id", str)  # a generation's request id
CLIENT_REQUEST_ID = web.RequestKey("tandem_client_request_id", str)  # the client's x-request-id
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def build_app(
    config: TandemConfig,
    engine: EngineClient,
    tokenizer: Tokenizer,
    recent_traces: RecentTraces | None = None,
) -> web.Application:
    """``recent_traces``: where the status page's waterfall comes from (none: empty)."""
    state = ServerState(
        config=config,
        engine=engine,
        tokenizer=tokenizer,
        metrics=ServerMetrics(config.coordinator.slo),
        limits=ServingLimits(
            model_name=config.model.name,
            max_model_len=config.model.max_model_len,
            max_prompt_tokens=config.max_prompt_tokens,
        ),
        created=int(time.time()),
    )
    app = web.Application(
        middlewares=[
            _request_id_middleware,
            error_middleware,
            _auth_middleware(config.coordinator.api_key),
        ],
        client_max_size=MAX_BODY_BYTES,
    )
    app[STATE] = state
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_get("/version", _version)
    app.router.add_get("/v1/requests/{request_id}/trace", _trace)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/admin/pools/{pool}/replicas", _scale)
    if os.environ.get(FAULT_INJECTION_ENV) == "1":  # tests only: refused in normal serving
        log.warning("fault injection is enabled (%s=1): POST /admin/faults", FAULT_INJECTION_ENV)
        app.router.add_post("/admin/faults", _arm_fault)
    board = StatusBoard(config, engine, state.metrics, lambda: state.num_in_flight, recent_traces)
    add_status_routes(app, board, auth_required=config.coordinator.api_key is not None)
    app.on_response_prepare.append(_add_request_id)
    return app


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare: runs for streamed, error and static responses alike, before headers go
    response.headers[REQUEST_ID_HEADER] = (
        request.get(CLIENT_REQUEST_ID) or request.get(REQUEST_ID) or f"req-{uuid.uuid4().hex}"
    )


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually listened on (useful with port 0)."""
    (address, *_) = runner.addresses
    return address[1]


async def serve(
    config: TandemConfig,
    engine: EngineClient,
    tokenizer: Tokenizer,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled; the caller owns the engine's lifetime. ``on_ready`` gets the bound
    port once the socket listens (the launcher prints it; port 0 picks a free one)."""
    runner = await start_server(
        build_app(config, engine, tokenizer), config.coordinator.host, config.coordinator.port
    )
    try:
        port = bound_port(runner)
        log.info("Tandem coordinator listening on %s:%d", config.coordinator.host, port)
        if on_ready is not None:
            on_ready(port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@web.middleware
async def _request_id_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """A client's ``x-request-id`` is checked here; a generation is then known by it everywhere
    (``cmpl-<id>``: traces, fault injection) and it is echoed back (``_add_request_id``)."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None:
        if not REQUEST_ID_PATTERN.fullmatch(given):
            return bad_request(
                f"{REQUEST_ID_HEADER} must be 1-128 characters of A-Z a-z 0-9 . _ : -",
                param=REQUEST_ID_HEADER,
            ).response()
        request[CLIENT_REQUEST_ID] = given
    return await handler(request)


def _auth_middleware(api_key: str | None) -> Middleware:
    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        keyed = request.path.startswith(("/v1/", "/admin/")) or request.path in KEYED_PATHS
        if api_key is not None and keyed:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken must not reveal how much of the key matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                raise ApiError(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    AUTHENTICATION,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check_key


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.config.model.name,
        "object": "model",
        "created": state.created,
        "owned_by": "tandem",
        "root": state.config.model.source,
        "max_model_len": state.config.model.max_model_len,
    }


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def _model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    if model_id != state.config.model.name:
        raise model_not_found(model_id, state.limits)
    return web.json_response(_model_card(state))


async def _tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(tokenize(await json_body(request), state.limits, state.tokenizer))


async def _detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(detokenize(await json_body(request), state.limits, state.tokenizer))


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": importlib.metadata.version("tandem-serve")})


async def _health(request: web.Request) -> web.Response:
    """200 ``ok``; 200 ``degraded`` when a pool runs below its target (a worker is being
    replaced); 503 ``unavailable`` when a pool has no live worker."""
    state = request.app[STATE]
    try:
        health = await asyncio.wait_for(state.engine.health(), HEALTH_TIMEOUT_S)
    except Exception as exc:  # an engine that cannot answer is not healthy
        log.warning("health check failed: %r", exc)
        health = {}
    pools = {name: health.get(name, PoolHealth(0, 0)) for name in state.config.pool_names}
    statuses = {p.status for p in pools.values()}
    status = "unavailable" if "down" in statuses else "degraded" if "degraded" in statuses else "ok"
    body = {
        "status": status,
        "pools": {n: {"status": p.status, "live": p.live, "target": p.target}
                  for n, p in pools.items()},
    }  # fmt: skip
    return web.json_response(body, status=503 if status == "unavailable" else 200)


async def _trace(request: web.Request) -> web.Response:
    """The trace of a request in flight or among the recent ones (coordinator/trace.py)."""
    state = request.app[STATE]
    request_id = request.match_info["request_id"]
    trace = getattr(state.engine, "trace", None)
    found = trace(request_id) if trace is not None else None
    if found is None:
        raise ApiError(404, f"no trace of request {request_id!r} (unknown, or no longer kept)",
                       NOT_FOUND, param="request_id", code="trace_not_found")  # fmt: skip
    return web.json_response(found)


async def _scale(request: web.Request) -> web.Response:
    """``{"replicas": N}``: the pool's new target; workers start (and join their peers) or drain
    (running requests finish, then they are shut down) in the background. 202 with the pool's
    live and target counts; GET /health follows the change."""
    state = request.app[STATE]
    pool = request.match_info["pool"]
    body = await json_body(request)
    replicas = body.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise bad_request(f"replicas must be an integer >= 1, got {replicas!r}", param="replicas")
    if pool not in state.config.pool_names:
        raise ApiError(404, f"no pool {pool!r} (pools: {', '.join(state.config.pool_names)})",
                       NOT_FOUND, param="pool")  # fmt: skip
    scale = getattr(state.engine, "scale", None)
    if scale is None:
        raise ApiError(404, "this engine cannot scale", NOT_FOUND, code="not_supported")
    health = await scale(pool, replicas)
    return web.json_response({"pool": pool, "target": health.target, "live": health.live},
                             status=202)  # fmt: skip


async def _arm_fault(request: web.Request) -> web.Response:
    """Test-only (TANDEM_FAULT_INJECTION=1): ``{"worker": "decode-0" | "decode", "point": ...,
    "action": ..., "nth": ..., "delay_s": ..., "request_id": ...}`` arms a fault on that worker,
    or on every live worker of that pool (engine/faults.py)."""
    state = request.app[STATE]
    body = await json_body(request)
    worker = body.pop("worker", None)
    if not isinstance(worker, str):
        raise bad_request("worker must be a worker name, e.g. decode-0", param="worker")
    arm = getattr(state.engine, "arm_fault", None)
    if arm is None:
        raise ApiError(404, "this engine has no fault injection", code="not_supported")
    try:
        armed = await arm(worker, body)
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0]), NOT_FOUND, param="worker") from None
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        raise bad_request(f"{type(cause).__name__}: {cause}".splitlines()[0]) from None
    return web.json_response({"armed": armed, "fault": body})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        state.metrics.set_engine_stats(await state.engine.stats())
    except Exception as exc:  # still serve the coordinator's own metrics
        log.warning("engine stats unavailable: %r", exc)
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    arrival = time.monotonic()
    endpoint = "chat" if kind == "chat" else "completions"
    given = request.get(CLIENT_REQUEST_ID)
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{given or uuid.uuid4().hex}"
    request[REQUEST_ID] = request_id
    # Queue check first: an overloaded server should not spend time reading or tokenizing.
    if state.num_in_flight >= state.config.coordinator.max_queued_requests:
        state.metrics.requests.labels(endpoint, "rejected_429").inc()
        raise ApiError(
            429,
            f"too many requests in flight ({state.num_in_flight}); retry later",
            RATE_LIMIT,
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    # The slot is taken before the first await, so concurrent arrivals cannot all pass the check.
    state.num_in_flight += 1
    state.metrics.in_flight.inc()
    slot_held = True

    def release_slot() -> None:
        """Once, at the request's last delta (before the client can read [DONE] and send its
        next request: the engine's wind-down after it must not count) or in the finally."""
        nonlocal slot_held
        if slot_held:
            slot_held = False
            state.num_in_flight -= 1
            state.metrics.in_flight.dec()
    outcome = "error"
    run: RequestRun | None = None
    try:
        try:
            body = await json_body(request)
            parse = parse_chat if kind == "chat" else parse_completion
            gen = parse(body, state.limits, state.tokenizer)
        except ApiError as exc:
            outcome = f"rejected_{exc.status}"
            raise
        if request_id in state.request_ids:
            raise bad_request(
                f"a request with {REQUEST_ID_HEADER} {request[CLIENT_REQUEST_ID]!r} is in flight",
                param=REQUEST_ID_HEADER,
            )
        state.request_ids.add(request_id)
        run = RequestRun(
            state.engine,
            state.metrics,
            request_id,
            list(gen.prompt_token_ids),
            [gen.choice_params(i) for i in range(gen.n)],
            arrival,
            state.config.coordinator.request_timeout_s,
            on_finished=release_slot,
        )
        builder = ResponseBuilder(
            request_id, state.limits.model_name, int(time.time()), gen, state.tokenizer
        )
        if gen.stream:
            response, outcome = await stream_response(request, run, builder)
        else:
            response, outcome = await collect_response(run, builder)
        return response
    except asyncio.CancelledError:
        outcome = "disconnect"
        raise
    except ApiError as exc:
        if not outcome.startswith("rejected_"):
            outcome = "timeout" if exc.type == TIMEOUT else "error"
            if exc.status < 500 and exc.type != TIMEOUT:  # a worker refused its input
                outcome = f"rejected_{exc.status}"
        raise
    finally:
        try:
            if run is not None:
                await run.close()  # raises CancelledError if cancelled again meanwhile ...
        finally:  # ... and the slot is given back all the same
            if run is not None:
                state.request_ids.discard(run.request_id)
            release_slot()
            state.metrics.requests.labels(endpoint, outcome).inc()
