"""Start (or join) a Ray cluster, create the worker actors of a topology, and serve HTTP.

    python -m coordinator.launch --config configs/local.yaml [--address auto] [--host H] [--port N]

is what ``tandem serve`` runs and what ``ray job submit -- python -m coordinator.launch ...``
runs on a cluster. Without ``--address`` it starts a private local Ray (no dashboard, usage stats
off) and shuts it down on exit; with one it joins that cluster and leaves it running. SIGINT and
SIGTERM (``ray job stop`` sends SIGTERM) stop the server, shut the workers down and kill them;
each awaited step of that has a time limit (``coordinator.bounded_stop``), and a stop still going
after STOP_WATCHDOG_S (``ray.shutdown`` included) prints every thread's stack.

This process hosts the coordinator and never imports torch: the tokenizer files are collected
by a child process, and the actors are ``WorkerHost``s that import their worker class themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import msgpack  # noqa: E402
import ray  # noqa: E402  (after the environment it reads at import)

from coordinator.bounded_stop import step  # noqa: E402
from coordinator.kv_index import KVEventStream, PrefixIndex  # noqa: E402
from coordinator.ray_client import RayEngineClient  # noqa: E402
from coordinator.server import (  # noqa: E402
    SHUTDOWN_GRACE_S,
    bound_port,
    build_app,
    start_server,
)
from coordinator.supervisor import Supervisor  # noqa: E402
from coordinator.token_stream import TokenStream  # noqa: E402
from coordinator.worker_host import WorkerHost  # noqa: E402
from coordinator.worker_pool import WorkerPool  # noqa: E402
from coordinator.worker_specs import (  # noqa: E402
    WorkerPlan,
    total_cpus,
    worker_plan,
    worker_plans,
)
from core.config import ConfigError, TandemConfig, load_config  # noqa: E402
from core.long_lived import freeze_long_lived  # noqa: E402
from core.tokenizer import Tokenizer, TokenizerFiles  # noqa: E402

log = logging.getLogger("tandem.launch")
T = TypeVar("T")

READY_TIMEOUT_S = 900.0  # first start on a cluster may download nothing but still load weights
SHUTDOWN_TIMEOUT_S = 15.0
STEP_TIMEOUT_S = 5.0  # a teardown step that should take milliseconds (bounded_stop.step)
# a stop still going after this long prints every thread's stack to stderr (faulthandler)
STOP_WATCHDOG_S = 45.0
MAX_WORKER_THREADS = 32  # concurrent actor calls per worker (stats, reserve, abort ...)


async def collect_tokenizer_files(source: str) -> TokenizerFiles:
    """The model's tokenizer, built in a child process (``python -m engine.tokenizer_files``:
    transformers and torch, which this process must not import; ~6 s of CPU for SmolLM2's GGUF),
    returned once that process has exited. Before, a Ray task built it, and its idle worker
    (holding torch) was ended by Ray in the first seconds of serving: on 2 CPUs that exit slowed
    the first requests' tokens ~2x (docs/benchmarks.md). The source must be readable here, where
    the coordinator runs. Cancelled, it kills the child and waits for it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tokenizer_files", source,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-20:])
        raise RuntimeError(
            f"building the tokenizer of model source {source!r} failed "
            f"(exit {proc.returncode}):\n{tail}"
        )
    return TokenizerFiles.from_dict(msgpack.unpackb(out))


@dataclass
class Deployment:
    """Everything one ``deploy`` created; ``shutdown`` undoes it."""

    client: RayEngineClient
    tokenizer: Tokenizer
    stream: TokenStream
    supervisor: Supervisor
    events: KVEventStream

    async def shutdown(self) -> None:
        await step("closing the client", self.client.aclose(), STEP_TIMEOUT_S)
        # no more replacements from here on
        await step("stopping the supervisor", self.supervisor.aclose(), STEP_TIMEOUT_S)
        live = [w.actor for w in self.supervisor.pool.workers.values() if w.alive]
        calls = [actor.call.remote("shutdown") for actor in live]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), SHUTDOWN_TIMEOUT_S
            )
        for actor in self.supervisor.every_actor():
            kill_actor(actor)
        await step("closing the token stream", self.stream.aclose(), STEP_TIMEOUT_S)
        await step("closing the KV event stream", self.events.aclose(), STEP_TIMEOUT_S)


def init_ray(config: TandemConfig, address: str | None, num_cpus: int | None) -> bool:
    """Join ``address`` or start a local Ray; True if this process started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    wanted = math.ceil(total_cpus(config))
    ray.init(
        num_cpus=num_cpus or max(wanted, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=True,
    )
    return True


def kill_actor(actor) -> None:
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def actor_spawner(config: TandemConfig) -> Callable[[WorkerPlan, int], object]:
    """(plan, incarnation) -> a new ``WorkerHost`` actor with the plan's resources."""
    host_class = ray.remote(WorkerHost)

    def spawn(plan: WorkerPlan, incarnation: int):
        spec = {**plan.spec, "incarnation": incarnation}
        return host_class.options(
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            max_concurrency=MAX_WORKER_THREADS,
            max_restarts=0,  # the supervisor replaces dead workers itself (new incarnation)
        ).remote(plan.class_path, spec)

    return spawn


async def deploy(config: TandemConfig, stream_host: str) -> Deployment:
    stream = TokenStream(stream_host)
    events = KVEventStream(PrefixIndex(), stream_host)
    pool = WorkerPool()
    plans = worker_plans(config, stream.address, events.address)
    log.info("starting %d workers: %s", len(plans), ", ".join(p.name for p in plans))

    def make_plan(role: str, index: int) -> WorkerPlan:
        return worker_plan(config, role, index, stream.address, events.address)

    supervisor = Supervisor(
        plans,
        pool,
        actor_spawner(config),
        kill_actor,
        restart=config.coordinator.workers.restart,
        ready_timeout_s=READY_TIMEOUT_S,
        make_plan=make_plan,
        drain_timeout_s=config.coordinator.workers.drain_timeout_s,
    )
    tokenizer_files = asyncio.create_task(collect_tokenizer_files(config.model.source))
    try:
        await supervisor.start()
        tokenizer = Tokenizer(await tokenizer_files)
        client = RayEngineClient(config, pool, supervisor, stream, tokenizer, events)
        await client.start()
    except BaseException:
        tokenizer_files.cancel()  # its child killed and reaped
        await asyncio.gather(tokenizer_files, return_exceptions=True)
        await supervisor.aclose()
        for actor in supervisor.every_actor():
            kill_actor(actor)
        await stream.aclose()
        await events.aclose()
        raise
    return Deployment(client, tokenizer, stream, supervisor, events)


async def serve_topology(
    config: TandemConfig,
    stream_host: str,
    stop: asyncio.Event,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Deploy, serve until ``stop`` is set, then tear down (Ray itself is the caller's). A stop
    while the workers start ends the start (deploy cleans up what it made) and serves nothing."""
    deployment = await unless_stopped(deploy(config, stream_host), stop)
    if deployment is None:
        log.info("stopped while starting")
        return
    try:
        app = build_app(config, deployment.client, deployment.tokenizer,
                        recent_traces=deployment.client.recent_traces)  # fmt: skip
        # everything is built, and no request has come yet (core/long_lived.py)
        frozen = freeze_long_lived()
        log.info("%d objects frozen in %.0f ms", frozen.objects, frozen.seconds * 1e3)
        runner = await start_server(app, config.coordinator.host, config.coordinator.port)
        try:
            url = f"http://{config.coordinator.host}:{bound_port(runner)}"
            log.info("Tandem serving %s (%s) at %s", config.model.name, config.mode, url)
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
            faulthandler.dump_traceback_later(STOP_WATCHDOG_S)  # cancelled by run()
            log.info("stopping: ending %d in-flight requests", len(deployment.client.records))
        finally:
            # In-flight streams end first (with an error event), so the HTTP server's graceful
            # shutdown does not wait on them; its handlers get SHUTDOWN_GRACE_S in any case.
            await step("closing the client", deployment.client.aclose(), STEP_TIMEOUT_S)
            await step("stopping the HTTP server", runner.cleanup(),
                       SHUTDOWN_GRACE_S + STEP_TIMEOUT_S)  # fmt: skip
    finally:
        await deployment.shutdown()


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None if ``stop`` is set first: then ``work`` is cancelled, and this
    returns once it has unwound. (Workers can take minutes to start, or never: Ctrl-C must not
    wait for them.)"""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML topology (configs/*.yaml)")
    parser.add_argument("--host", help="HTTP bind address (overrides coordinator.host)")
    parser.add_argument("--port", type=int, help="HTTP port (overrides coordinator.port)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument(
        "--address",
        help="join this Ray cluster ('auto' inside `ray job submit`); default: a local Ray",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    parser.add_argument(
        "--stream-host",
        help="where workers send tokens (default 127.0.0.1, or this node's IP with --address)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config).with_overrides(
            host=args.host, port=args.port, api_key=args.api_key
        )
    except (ConfigError, OSError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    # Ctrl-C inside ray.init's connect crashed the process (SIGSEGV in Ray's teardown) and could
    # leave its processes behind: from here until the event loop's handlers take over, a signal
    # is only noted, and the loop then stops at once
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, _frame: held.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    started_ray = False
    try:
        started_ray = init_ray(config, args.address, args.num_cpus)
        stream_host = args.stream_host or (
            ray.util.get_node_ip_address() if args.address else "127.0.0.1"
        )

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if held:
                stop.set()

            def announce(url: str) -> None:
                print(f"Tandem: serving {config.model.name} at {url}", flush=True)

            await serve_topology(config, stream_host, stop, announce)

        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            ray.shutdown()
        faulthandler.cancel_dump_traceback_later()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.launch", description="Serve a Tandem topology on Ray."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
