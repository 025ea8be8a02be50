"""The live status page: ``GET /`` and ``GET /status`` (static HTML + JS, no external asset)
polling ``GET /v1/status`` (JSON, behind the API key like every /v1 route).

``StatusBoard.snapshot()`` builds the JSON (schema in docs/serving.md) from three sources:
the engine's ``stats()`` (pools, workers, transfer counters), the front end's last-minute
windows (``ServerMetrics.recent``) and, when the server was given one, a source of recent
request traces (``TraceSummary``; without one ``recent_requests`` is empty).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from importlib import resources

from aiohttp import web

from coordinator.engine_client import EngineClient, EngineStats, PoolStats
from coordinator.metrics import ServerMetrics
from coordinator.trace import TraceSummary
from core.config import TandemConfig

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
MAX_RECENT_REQUESTS = 50
PAGE_ROUTES = ("/", "/status")
ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}  # under /static/
AUTH_MARK = "{{AUTH}}"  # in status.html: "required" or "none", so the page asks for a key first
NO_CACHE = {"Cache-Control": "no-store"}


RecentTraces = Callable[[], Sequence[TraceSummary]]  # most recent first


class StatusBoard:
    def __init__(
        self,
        config: TandemConfig,
        engine: EngineClient,
        metrics: ServerMetrics,
        num_in_flight: Callable[[], int],
        recent_traces: RecentTraces | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.num_in_flight = num_in_flight
        self.recent_traces = recent_traces

    async def snapshot(self) -> dict:
        error = None
        try:
            stats = await asyncio.wait_for(self.engine.stats(), STATS_TIMEOUT_S)
        except Exception as exc:  # the page still shows the front end's own figures
            log.warning("engine stats unavailable for /v1/status: %r", exc)
            stats, error = EngineStats(), f"engine stats unavailable: {type(exc).__name__}"
        now = time.monotonic()
        recent = self.metrics.recent
        bytes_total = sum(t.num_bytes for t in stats.transfers)
        slo = self.metrics.slo
        traces = self.recent_traces() if self.recent_traces is not None else ()
        return {
            "model": self.config.model.name,
            "mode": self.config.mode,
            "uptime_s": now - recent.started,
            "window_s": recent.ttft.window_s,
            "engine_error": error,
            "slo": None if slo is None else {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
            "requests": {
                "in_flight": self.num_in_flight(),
                "running": stats.num_running,
                "waiting": stats.num_waiting,
                "admitted_per_s": recent.admitted.rate(now),
                "finished_per_s": recent.finished.rate(now),
                "goodput_per_s": recent.good.rate(now),
                "finished_in_window": recent.finished.count(now),
            },
            "latency_ms": {"ttft": recent.ttft.summary(now), "itl": recent.itl.summary(now)},
            "kv_transfer": {
                "backends": [t.backend for t in stats.transfers],
                "bytes_total": bytes_total,
                "seconds_total": sum(t.seconds for t in stats.transfers),
                "bytes_per_s": recent.transfer_bytes.rate(now, bytes_total),
            },
            "pools": [_pool_json(p, stats) for p in stats.pools],
            "workers": [dataclasses.asdict(w) for w in stats.workers],
            "recent_requests": [t.to_json() for t in list(traces)[:MAX_RECENT_REQUESTS]],
        }


def _pool_json(pool: PoolStats, stats: EngineStats) -> dict:
    members = [w for w in stats.workers if w.pool == pool.name]
    return {
        "name": pool.name,
        "workers_live": sum(w.live for w in members),
        "workers_total": len(members),
        "running": pool.num_running,
        "waiting": pool.num_waiting,
        "kv_blocks_used": pool.num_kv_blocks_used,
        "kv_blocks_total": pool.num_kv_blocks_total,
    }


def add_status_routes(app: web.Application, board: StatusBoard, auth_required: bool) -> None:
    static = resources.files("coordinator") / "static"
    page = (static / "status.html").read_text().replace(
        AUTH_MARK, "required" if auth_required else "none"
    )
    assets = {name: (static / name).read_bytes() for name in ASSETS}

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", headers=NO_CACHE)

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in assets:
            raise web.HTTPNotFound()
        return web.Response(body=assets[name], content_type=ASSETS[name], headers=NO_CACHE)

    async def status_json(request: web.Request) -> web.Response:
        return web.json_response(await board.snapshot(), headers=NO_CACHE)

    for path in PAGE_ROUTES:
        app.router.add_get(path, status_page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/v1/status", status_json)

