"""The topology config: YAML -> frozen, typed, validated objects (torch-free).

Layout of a file (every key but ``model.name`` and ``pools`` has a default)::

    mode: disaggregated            # or colocated
    model: {name, source, dtype, quantization, keep_dense_weights, quantize_activations,
            max_model_len}
    pools:
      prefill:  {replicas, resources, scheduler, kv_cache}               # disaggregated only
      decode:   {replicas, resources, scheduler, kv_cache, speculative}  # disaggregated only
      colocated: {same keys as decode}                                   # colocated only
    kv_transfer: {backend, side_channel_host, side_channel_port_range, timeout_s, on_failure,
                  layer_groups}
    coordinator: {host, port, api_key, max_queued_requests, max_prompt_tokens,
                  request_timeout_s, routing, kv_routing: {overlap_weight, load_weight},
                  local_prefill: {max_tokens, prefill_queue_tokens},
                  retry: {max_attempts, worker_wait_s},
                  workers: {restart, hang_timeout_s, max_step_failures, drain_timeout_s},
                  slo: {ttft_ms, tpot_ms}, tracing: {keep, log, otel}}

Colocated mode uses its own ``pools.colocated`` section rather than reusing ``pools.decode``: a
colocated worker both prefills and decodes, so naming it after one role would mislead, and a file
that says ``mode: colocated`` but still has a prefill pool is rejected instead of half-ignored.

Every section forbids unknown keys and scalars are strict (``"8000"`` is not a port, ``true`` is
not a count), so a typo is an error naming its key path and the allowed keys or values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as _ValidationError

from core.config_errors import ConfigError, problems_from
from core.config_yaml import load_yaml_mapping

__all__ = ["ConfigError", "TandemConfig", "load_config", "parse_config", "BUILTIN_MODELS"]

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("smollm2-135m-instruct",)

ModelDtype = Literal["auto", "float32", "float16", "bfloat16"]  # auto: engine.engine_config
Quantization = Literal["none", "int8", "int4"]  # weight-only: engine/quantized_weight.py
KVDtype = Literal["auto", "fp8_e4m3"]  # auto: the model dtype
BlockSize = Literal[1, 2, 4, 8, 16, 32, 64, 128, 256]
SpecMethod = Literal["none", "ngram", "draft"]
TransferBackend = Literal["nixl", "tcp"]
TransferFailurePolicy = Literal["retry", "recompute", "fail"]
TraceExporter = Literal["none", "console", "otlp"]
# mirrors coordinator.router.POLICIES
RoutingPolicy = Literal["least_loaded", "round_robin", "kv_aware"]
Mode = Literal["disaggregated", "colocated"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(_Section):
    name: str = Field(min_length=1)  # the name clients pass as "model"
    source: str = BUILTIN_PREFIX + BUILTIN_MODELS[0]  # builtin:<name> | HF directory | .gguf path
    # auto: bfloat16 on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 / AMX), else
    # float32 (engine.engine_config.auto_dtype; each worker resolves it on its own device)
    dtype: ModelDtype = "float32"
    quantization: Quantization = "none"  # weight-only int8 (per channel) / int4 (groups of 32)
    # with quantization: also keep each weight dense (model dtype) for steps of more than 8 rows
    # (64 with quantize_activations: prefill chunks, large decode batches), where dense kernels
    # win; costs the dense memory
    keep_dense_weights: bool = False
    # with quantization, on CPU: the steps that take the quantized kernels (up to 64 rows) round
    # each quantized linear's input to int8 (blocks of 32) and take integer dot products, as
    # llama.cpp does (kernels/csrc/quant_linear_a8.cpp): faster, and the outputs move
    # (docs/benchmarks.md)
    quantize_activations: bool = False
    max_model_len: PositiveInt = 2048

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, source: str) -> str:
        return check_model_source(source)

    @model_validator(mode="after")
    def _activations_need_int4(self) -> ModelSection:
        check_quantize_activations(self.quantize_activations, self.quantization)
        return self


def check_quantize_activations(quantize_activations: bool, quantization: str) -> None:
    if quantize_activations and quantization == "none":
        raise ValueError("quantize_activations: true needs quantization: int4 or int8 (got 'none')")


def check_model_source(source: str) -> str:
    """Paths are not checked for existence: a GPU config names files on another machine."""
    if not source:
        raise ValueError("source must not be empty")
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            allowed = ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS)
            raise ValueError(
                f"unknown built-in model {name!r} (allowed: {allowed}, a HF directory or a "
                ".gguf path)"
            )
    return source


class Resources(_Section):
    """Ray resources per replica (one actor each)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class SchedulerLimits(_Section):
    max_batch_tokens: PositiveInt = 2048  # tokens per forward pass
    chunk_size: PositiveInt = 512  # longest prompt piece per step (chunked prefill)
    max_num_seqs: PositiveInt = 64  # sequences per batch

    @model_validator(mode="after")
    def _chunk_fits(self) -> SchedulerLimits:
        if self.chunk_size > self.max_batch_tokens:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must be <= max_batch_tokens "
                f"({self.max_batch_tokens})"
            )
        return self


class KVCacheSection(_Section):
    """Size the cache by a block count or by a memory budget (exactly one of the two)."""

    num_blocks: PositiveInt | None = None
    memory_gib: PositiveFloat | None = None
    block_size: BlockSize = 16
    dtype: KVDtype = "auto"

    @model_validator(mode="after")
    def _one_size(self) -> KVCacheSection:
        if (self.num_blocks is None) == (self.memory_gib is None):
            raise ValueError("set exactly one of num_blocks, memory_gib")
        return self

    @property
    def memory_bytes(self) -> int | None:
        """The budget in bytes (None when sized by num_blocks); the engine divides it by its
        bytes per block, which depends on the model and the KV dtype."""
        return None if self.memory_gib is None else int(self.memory_gib * (1 << 30))


class Speculative(_Section):
    """Speculative decoding on decode (and colocated) workers: see
    engine.engine_config.SpeculativeConfig for what each field does."""

    method: SpecMethod = "none"
    num_speculative_tokens: int = Field(0, ge=0, le=16)
    ngram_min: PositiveInt = 1  # shortest suffix looked up in the context
    ngram_max: PositiveInt = 4  # longest suffix looked up
    draft_model: str | None = None  # a model source, as in model.source

    @field_validator("draft_model")
    @classmethod
    def _draft_source(cls, source: str | None) -> str | None:
        return None if source is None else check_model_source(source)

    @model_validator(mode="after")
    def _consistent(self) -> Speculative:
        if self.method != "none" and self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 with method {self.method!r}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(
                f"ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})"
            )
        if self.method == "draft":
            if self.draft_model is None:
                raise ValueError("draft_model is required with method 'draft'")
        elif self.draft_model is not None:
            raise ValueError(f"draft_model is only used with method 'draft', not {self.method!r}")
        return self


class PoolSection(_Section):
    replicas: PositiveInt = 1
    resources: Resources = Resources()
    scheduler: SchedulerLimits = SchedulerLimits()
    kv_cache: KVCacheSection
    enable_prefix_caching: bool = True  # reuse KV blocks of shared prompt prefixes


class DecodePoolSection(PoolSection):
    speculative: Speculative = Speculative()


class Pools(_Section):
    prefill: PoolSection | None = None
    decode: DecodePoolSection | None = None
    colocated: DecodePoolSection | None = None


class KVTransferSection(_Section):
    backend: TransferBackend = "nixl"
    side_channel_host: str = "127.0.0.1"  # where decode workers listen for handshakes
    side_channel_port_range: tuple[int, int] = Field((5600, 5699), strict=False)  # inclusive
    timeout_s: PositiveFloat = 30.0
    # What a failed or timed-out KV transfer does to its request (token 1 already streamed):
    # recompute: the decode worker prefills prompt + tokens itself (default: a failed transfer
    #            says nothing about the decode worker, which already holds the request's room,
    #            and this path needs no working link; the cost is one prefill on decode)
    # retry:     a new prefill + transfer, routed afresh (maybe over another link)
    # fail:      the request ends with an error
    on_failure: TransferFailurePolicy = "recompute"
    # a prompt's KV leaves prefill in this many layer groups, each sent as soon as the forward
    # of the prompt's last chunk has computed it (the copy overlaps the rest); 1: after it
    layer_groups: PositiveInt = 1

    @model_validator(mode="after")
    def _ports(self) -> KVTransferSection:
        low, high = self.side_channel_port_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(
                f"side_channel_port_range must be [low, high] with 1 <= low <= high <= 65535, "
                f"got [{low}, {high}]"
            )
        return self


class RetrySection(_Section):
    """How hard the coordinator tries to finish a request that a worker or a transfer failed."""

    max_attempts: PositiveInt = 3  # placements per request, the first included (1: no retry)
    worker_wait_s: PositiveFloat = 60.0  # a request waits this long for a pool with no worker


class KVRoutingSection(_Section):
    """Weights of ``routing: kv_aware``: a worker's cost is ``overlap_weight`` x the prompt blocks
    it would have to compute (or receive) + ``load_weight`` x the blocks of work it already has
    (decode: KV blocks in use; prefill: queued prompt blocks). Lowest cost wins."""

    overlap_weight: float = Field(1.0, ge=0)
    load_weight: float = Field(1.0, ge=0)


class LocalPrefillSection(_Section):
    """Conditional disaggregation: when a decode worker prefills a request itself (no transfer)
    instead of handing it to the prefill pool."""

    # the part of the prompt the decode worker does not have cached is at most this long (0:
    # never: a disaggregated topology disaggregates unless asked otherwise)
    max_tokens: int = Field(0, ge=0)
    # ... or every prefill worker has more than this many prompt tokens queued (0: never)
    prefill_queue_tokens: int = Field(0, ge=0)
    # (with no live prefill worker at all, decode workers always prefill themselves)


class WorkersSection(_Section):
    """Supervision of the worker actors: ``replicas`` of each pool is the target."""

    restart: bool = True  # replace a worker that died, hung or kept failing
    hang_timeout_s: PositiveFloat = 30.0  # no answer, or busy without progress, this long: hung
    max_step_failures: PositiveInt = 3  # failed engine steps in a row before it is replaced
    drain_timeout_s: PositiveFloat = 120.0  # scaling down: running requests get this long


class TracingSection(_Section):
    """Per-request traces (coordinator/trace.py): GET /v1/requests/{id}/trace for recent ones."""

    keep: PositiveInt = 1000  # finished requests whose trace stays readable
    log: str | None = Field(None, min_length=1)  # append one JSON line per finished request
    otel: TraceExporter = "none"  # OpenTelemetry spans: console, or otlp (OTEL_EXPORTER_* env)


class SloSection(_Section):
    """Latency targets a request must meet to count as goodput (``tandem_goodput_requests``):
    the definitions of vLLM's ``bench serve`` (TPOT = (last token - first token) / (tokens - 1),
    0 for a one-token answer). An unset target is not checked; at least one must be set."""

    ttft_ms: PositiveFloat | None = None  # arrival -> first token
    tpot_ms: PositiveFloat | None = None  # mean gap between later tokens

    @model_validator(mode="after")
    def _some_target(self) -> SloSection:
        if self.ttft_ms is None and self.tpot_ms is None:
            raise ValueError("set at least one of ttft_ms, tpot_ms")
        return self


class CoordinatorSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    api_key: str | None = Field(None, min_length=1)  # clients send "Authorization: Bearer <key>"
    max_queued_requests: PositiveInt = 256  # requests in flight before the next gets 429
    max_prompt_tokens: PositiveInt | None = None  # None: model.max_model_len - 1
    request_timeout_s: PositiveFloat = 600.0
    routing: RoutingPolicy = "least_loaded"
    kv_routing: KVRoutingSection = KVRoutingSection()
    local_prefill: LocalPrefillSection = LocalPrefillSection()
    retry: RetrySection = RetrySection()
    workers: WorkersSection = WorkersSection()
    slo: SloSection | None = None  # None: every finished request counts as goodput
    tracing: TracingSection = TracingSection()


class TandemConfig(_Section):
    mode: Mode = "disaggregated"
    model: ModelSection
    pools: Pools
    kv_transfer: KVTransferSection = KVTransferSection()
    coordinator: CoordinatorSection = CoordinatorSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> TandemConfig:
        problems = _cross_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def pool_names(self) -> tuple[str, ...]:
        return ("colocated",) if self.mode == "colocated" else ("prefill", "decode")

    def pool(self, name: str) -> PoolSection:
        section = getattr(self.pools, name) if name in self.pool_names else None
        if section is None:
            raise KeyError(f"no pool {name!r} in {self.mode} mode (pools: {self.pool_names})")
        return section

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt admitted: one position is left for the first generated token."""
        limit = self.coordinator.max_prompt_tokens
        return self.model.max_model_len - 1 if limit is None else limit

    def with_overrides(
        self, *, host: str | None = None, port: int | None = None, api_key: str | None = None
    ) -> TandemConfig:
        """A re-validated copy with command-line overrides of the coordinator's address/key."""
        data = self.model_dump()
        updates = {"host": host, "port": port, "api_key": api_key}
        data["coordinator"].update({k: v for k, v in updates.items() if v is not None})
        return parse_config(data)


def _cross_problems(cfg: TandemConfig) -> list[str]:
    problems = []
    wanted = set(cfg.pool_names)
    for name in ("prefill", "decode", "colocated"):
        present = getattr(cfg.pools, name) is not None
        if name in wanted and not present:
            problems.append(f"pools.{name}: required when mode is {cfg.mode}")
        elif name not in wanted and present:
            problems.append(
                f"pools.{name}: not used when mode is {cfg.mode} "
                f"(allowed pools: {', '.join(cfg.pool_names)})"
            )
    if cfg.mode == "disaggregated" and cfg.pools.prefill and cfg.pools.decode:
        # KV moves block for block, so both sides must agree on the block shape.
        prefill_bs = cfg.pools.prefill.kv_cache.block_size
        decode_bs = cfg.pools.decode.kv_cache.block_size
        if prefill_bs != decode_bs:
            problems.append(
                f"pools.prefill.kv_cache.block_size: must equal pools.decode.kv_cache.block_size "
                f"({prefill_bs} != {decode_bs})"
            )
    limit = cfg.coordinator.max_prompt_tokens
    if limit is not None and limit >= cfg.model.max_model_len:
        problems.append(
            f"coordinator.max_prompt_tokens: must be < model.max_model_len "
            f"({limit} >= {cfg.model.max_model_len})"
        )
    return problems


def parse_config(data: object, source: str | None = None) -> TandemConfig:
    """Validate a parsed YAML/JSON mapping; raise one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: expected a mapping, got {type(data).__name__}"], source)
    try:
        return TandemConfig.model_validate(data)
    except _ValidationError as exc:
        raise ConfigError(problems_from(exc, TandemConfig), source) from None


def load_config(path: str | Path) -> TandemConfig:
    return parse_config(load_yaml_mapping(path), source=str(path))
