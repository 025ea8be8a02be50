"""The boundary between the HTTP front end and whatever runs the model.

The Ray-backed disaggregated client and an in-process client both implement ``EngineClient``; the
front end (``coordinator.server``) only ever talks to this Protocol, so it never imports torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from core.outputs import OutputDelta
from core.sampling_params import SamplingParams


@dataclass(frozen=True)
class PoolStats:
    """Load of one pool (summed over its live workers) at the time of ``stats()``."""

    name: str  # "prefill" | "decode" | "colocated"
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_running: int = 0  # sequences in a batch on this pool
    num_waiting: int = 0  # sequences queued on this pool

    def __post_init__(self) -> None:
        if not 0 <= self.num_kv_blocks_used <= self.num_kv_blocks_total:
            raise ValueError(
                f"pool {self.name}: need 0 <= used <= total KV blocks, got "
                f"{self.num_kv_blocks_used}/{self.num_kv_blocks_total}"
            )


@dataclass(frozen=True)
class PoolHealth:
    """Live workers of a pool against its target (``replicas``)."""

    live: int
    target: int

    @property
    def status(self) -> str:
        """``down`` (no live worker: requests wait or fail), ``degraded`` (fewer than the
        target, e.g. one is being restarted) or ``ok``."""
        if self.live == 0:
            return "down"
        return "degraded" if self.live < self.target else "ok"


@dataclass(frozen=True)
class FaultStats:
    """Cumulative fault-tolerance counters of the engine."""

    retries: tuple[tuple[str, str, int], ...] = ()  # (stage, reason, count): new attempts
    migrations: int = 0  # new attempts that resumed after tokens had been streamed
    restarts: tuple[tuple[str, int], ...] = ()  # (pool, count): workers replaced
    leases_revoked: int = 0  # blocks held for requests the coordinator had ended (audit)


@dataclass(frozen=True)
class RoutingStats:
    """Cumulative routing counters of the engine."""

    prefill_locations: tuple[tuple[str, str, int], ...] = ()  # (remote | local, reason, count)
    decisions: tuple[tuple[str, str, int], ...] = ()  # (pool, prefix | load | round_robin, n)
    prefix_hit_tokens: tuple[tuple[str, int], ...] = ()  # (pool, prompt tokens found cached)


@dataclass(frozen=True)
class TransferStats:
    """Cumulative KV-transfer counters of one backend since the engine started."""

    backend: str  # "nixl" | "tcp" | "local"
    num_bytes: int
    seconds: float


@dataclass(frozen=True)
class SpecStats:
    """Speculative decoding, cumulative over the serving workers (dead ones included)."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    verified: int = 0  # sequence-steps that verified at least one proposal
    accepted_per_position: tuple[int, ...] = ()
    proposed_per_position: tuple[int, ...] = ()

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification (accepted drafts + the target's own token)."""
        return (self.accepted_tokens + self.verified) / self.verified if self.verified else 0.0


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the status page shows it (``GET /v1/status``), from its latest stats."""

    name: str
    pool: str
    live: bool
    incarnation: int  # restarts of this worker so far (0: the first process)
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics. ``num_running``/``num_waiting`` count requests (not sequences
    per pool): a request waiting for prefill is waiting, one in any batch is running."""

    pools: tuple[PoolStats, ...] = ()
    transfers: tuple[TransferStats, ...] = ()
    num_running: int = 0
    num_waiting: int = 0
    spec: SpecStats | None = None  # None: no worker speculates
    health: dict[str, PoolHealth] = field(default_factory=dict)
    workers: tuple[WorkerStatus, ...] = ()  # every worker's current incarnation
    faults: FaultStats = FaultStats()
    routing: RoutingStats = RoutingStats()


@runtime_checkable
class EngineClient(Protocol):
    """What the front end needs from an engine.

    ``generate`` is an async generator (``async def`` with ``yield``): it yields ``OutputDelta``s
    of one request until one has ``finish_reason`` set, then stops. It applies every stopping
    rule itself (max_tokens, EOS unless ignore_eos, min_tokens, stop strings and stop_token_ids);
    the front end only relays. An implementation may also be a coroutine that returns an async
    iterator; the front end accepts both.

    ``abort`` must be idempotent and safe to call for a request that already finished or was
    never seen: the front end calls it whenever it stops reading early (client disconnect,
    timeout, error), and the engine then frees the request's blocks on every worker.

    ``health`` maps each pool name to its live and target worker counts.

    ``fork_of`` (choices 1.. of an n > 1 request; the front end passes it only then): the id of
    the request in flight with the same prompt (choice 0), whose generate was called first. An
    engine that can share the prompt's KV places this request where that request's prompt KV
    is, once it is there (the Ray engine: same decode worker, local prefill of the tail past
    the cached blocks); one that cannot may ignore it.
    """

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fork_of: str | None = None,
    ) -> AsyncIterator[OutputDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def health(self) -> dict[str, PoolHealth]: ...

    async def stats(self) -> EngineStats: ...


@runtime_checkable
class Tokenizer(Protocol):
    """The torch-free tokenizer the coordinator uses (implemented in ``core.tokenizer``)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: object,
    ) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    @property
    def vocab_size(self) -> int: ...
