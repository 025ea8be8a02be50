"""The YAML topology -> one plain-dict ``WorkerSpec`` per actor (docs/serving.md), torch-free.

``engine`` holds ``engine.engine_config.EngineConfig`` fields. On CPU a worker gets as many
intra-op threads as CPUs it reserves: OpenMP threads of two workers fighting over the same cores
slow every op by an order of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import PoolSection, TandemConfig

# Actor classes by role, imported by path inside the worker process only (they import torch).
WORKER_CLASSES = {
    "prefill": "prefill.worker:PrefillWorker",
    "decode": "decode.worker:DecodeWorker",
    "colocated": "engine.colocated_worker:ColocatedWorker",
}


@dataclass(frozen=True)
class WorkerPlan:
    name: str  # "prefill-0", "decode-1", ...
    role: str
    class_path: str
    num_cpus: float
    num_gpus: float
    spec: dict


def engine_fields(config: TandemConfig, pool: PoolSection) -> dict:
    on_gpu = pool.resources.num_gpus > 0
    kv = pool.kv_cache
    fields = {
        "model": config.model.source,
        "dtype": config.model.dtype,
        "quantization": config.model.quantization,
        "keep_dense_weights": config.model.keep_dense_weights,
        "quantize_activations": config.model.quantize_activations,
        "max_model_len": config.model.max_model_len,
        "device": "cuda" if on_gpu else "cpu",
        "block_size": kv.block_size,
        "num_blocks": kv.num_blocks,
        "kv_cache_dtype": kv.dtype,
        "max_num_seqs": pool.scheduler.max_num_seqs,
        "max_num_batched_tokens": pool.scheduler.max_batch_tokens,
        "chunk_size": pool.scheduler.chunk_size,
        "enable_prefix_caching": pool.enable_prefix_caching,
        "num_threads": None if on_gpu else max(1, int(pool.resources.num_cpus)),
    }
    if kv.memory_bytes is not None:
        fields["kv_cache_bytes"] = kv.memory_bytes
    spec = getattr(pool, "speculative", None)  # decode and colocated pools
    if spec is not None and spec.method != "none":
        fields["speculative"] = {
            "method": spec.method,
            "num_speculative_tokens": spec.num_speculative_tokens,
            "ngram_min": spec.ngram_min,
            "ngram_max": spec.ngram_max,
            "draft_model": spec.draft_model,
        }
    return fields


def worker_plan(
    config: TandemConfig, role: str, index: int, output_address: str, events_address: str | None
) -> WorkerPlan:
    """The actor ``<role>-<index>``: its pool's engine and resources, the coordinator's token
    stream and KV-event addresses."""
    transfer = config.kv_transfer
    pool = config.pool(role)
    name = f"{role}-{index}"
    spec = {
        "name": name,
        "role": role,
        "engine": {
            **engine_fields(config, pool),
            "record_kv_events": events_address is not None,
            # a decode worker prefilling a request itself (local prefill, recompute) keeps
            # decoding between the prompt's chunks
            "interleave_prefill": role == "decode",
        },
        "kv_transfer": {
            "backend": transfer.backend,
            "host": transfer.side_channel_host,
            "port_range": list(transfer.side_channel_port_range),
            "timeout_s": transfer.timeout_s,
            "layer_groups": transfer.layer_groups,
        },
        "output_address": output_address,
        "events_address": events_address,
        "max_step_failures": config.coordinator.workers.max_step_failures,
    }
    return WorkerPlan(name, role, WORKER_CLASSES[role], pool.resources.num_cpus,
                      pool.resources.num_gpus, spec)  # fmt: skip


def worker_plans(
    config: TandemConfig, output_address: str, events_address: str | None = None
) -> list[WorkerPlan]:
    """Every actor of the topology, decode before prefill (prefill connects to decode)."""
    order = ("colocated",) if config.mode == "colocated" else ("decode", "prefill")
    return [
        worker_plan(config, role, i, output_address, events_address)
        for role in order
        for i in range(config.pool(role).replicas)
    ]


def total_cpus(config: TandemConfig) -> float:
    return sum(
        config.pool(role).resources.num_cpus * config.pool(role).replicas
        for role in config.pool_names
    )
