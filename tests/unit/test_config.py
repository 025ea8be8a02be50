"""The topology config: every shipped file loads; typos and bad values name their key path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, TandemConfig, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _local() -> dict:
    return yaml.safe_load((CONFIGS / "local.yaml").read_text())


def _problems(data: dict) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_every_file_in_configs_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "local.yaml",
        "colocated.yaml",
        "gpu-1p1d.yaml",
        "gpu-2p4d.yaml",
    }
    for path in files:
        assert isinstance(load_config(path), TandemConfig), path


def test_local_yaml_values():
    cfg = load_config(CONFIGS / "local.yaml")
    assert cfg.mode == "disaggregated"
    assert cfg.pool_names == ("prefill", "decode")
    assert cfg.model.source == "builtin:smollm2-135m-instruct"
    assert cfg.model.dtype == "float32"
    for name in cfg.pool_names:
        pool = cfg.pool(name)
        assert pool.replicas == 1
        assert pool.resources.num_cpus == 1 and pool.resources.num_gpus == 0
    assert cfg.kv_transfer.backend == "nixl"
    assert (cfg.coordinator.host, cfg.coordinator.port) == ("127.0.0.1", 8000)
    assert cfg.coordinator.api_key is None
    assert cfg.max_prompt_tokens == cfg.model.max_model_len - 1


def test_colocated_and_gpu_values():
    colocated = load_config(CONFIGS / "colocated.yaml")
    assert colocated.pool_names == ("colocated",)
    assert colocated.pool("colocated").kv_cache.num_blocks == 1024
    with pytest.raises(KeyError):
        colocated.pool("decode")

    big = load_config(CONFIGS / "gpu-2p4d.yaml")
    assert big.model.dtype == "bfloat16"
    assert (big.pools.prefill.replicas, big.pools.decode.replicas) == (2, 4)
    assert big.pools.decode.resources.num_gpus == 1
    assert big.pools.decode.kv_cache.dtype == "fp8_e4m3"
    assert big.pools.decode.kv_cache.memory_gib == 48
    assert big.pools.decode.kv_cache.memory_bytes == 48 * 2**30
    assert big.pools.decode.kv_cache.num_blocks is None
    assert colocated.pool("colocated").kv_cache.memory_bytes is None
    assert big.pools.prefill.enable_prefix_caching is True
    assert big.pools.decode.speculative.method == "draft"
    assert big.kv_transfer.side_channel_port_range == (5600, 5799)
    assert load_config(CONFIGS / "gpu-1p1d.yaml").pools.decode.speculative.method == "ngram"


def test_config_is_frozen():
    cfg = parse_config(_local())
    with pytest.raises(ValueError):
        cfg.coordinator.port = 1  # type: ignore[misc]


def test_bad_literal_names_path_and_allowed_values():
    data = _local()
    data["pools"]["decode"]["kv_cache"]["dtype"] = "fp8"
    (problem,) = _problems(data)
    assert problem.startswith("pools.decode.kv_cache.dtype: ")
    assert "'fp8'" in problem and "(allowed: auto, fp8_e4m3)" in problem


def test_typo_key_names_path_and_allowed_keys():
    data = _local()
    data["pools"]["decode"]["kv_cache"]["blok_size"] = 16
    data["coordinator"]["prot"] = 8001
    problems = _problems(data)
    assert problems == (
        "pools.decode.kv_cache.blok_size: unknown key "
        "(allowed: num_blocks, memory_gib, block_size, dtype)",
        "coordinator.prot: unknown key (allowed: host, port, api_key, max_queued_requests, "
        "max_prompt_tokens, request_timeout_s, routing, kv_routing, local_prefill, retry, "
        "workers, slo, tracing)",
    )


def test_speculative_only_on_decode():
    data = _local()
    data["pools"]["prefill"]["speculative"] = {"method": "ngram"}
    (problem,) = _problems(data)
    assert problem.startswith("pools.prefill.speculative: unknown key")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ("model", "dtype"),
            "fp16",
            "model.dtype: invalid value 'fp16' (allowed: auto, float32, float16, bfloat16)",
        ),
        (
            ("model", "quantization"),
            "q4",
            "model.quantization: invalid value 'q4' (allowed: none, int8, int4)",
        ),
        (
            ("model", "quantize_activations"),
            True,
            "model: quantize_activations: true needs quantization: int4 or int8 (got 'none')",
        ),
        (("coordinator", "port"), "8000", "coordinator.port: "),
        (("coordinator", "port"), 70000, "coordinator.port: "),
        (("coordinator", "routing"), "random", "(allowed: least_loaded, round_robin, kv_aware)"),
        (
            ("kv_transfer", "backend"),
            "rdma",
            "kv_transfer.backend: invalid value 'rdma' (allowed: nixl, tcp)",
        ),
        (("pools", "decode", "replicas"), 0, "pools.decode.replicas: "),
        (("pools", "decode", "replicas"), True, "pools.decode.replicas: "),
        (("pools", "decode", "kv_cache", "block_size"), 12, "(allowed: 1, 2, 4, 8, 16, 32"),
        (("pools", "decode", "speculative", "method"), "medusa", "(allowed: none, ngram, draft)"),
        (("model", "source"), "builtin:gpt2", "model.source: unknown built-in model 'gpt2'"),
        (("mode",), "split", "mode: invalid value 'split' (allowed: disaggregated, colocated)"),
    ],
)
def test_bad_values(path, value, expected):
    data = _local()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = _problems(data)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"num_blocks": 8, "memory_gib": 1.0}, "set exactly one of num_blocks, memory_gib"),
        ({"block_size": 16}, "set exactly one of num_blocks, memory_gib"),
    ],
)
def test_kv_cache_size_exactly_one(section, expected):
    data = _local()
    data["pools"]["decode"]["kv_cache"] = section
    (problem,) = _problems(data)
    assert problem.startswith("pools.decode.kv_cache: ") and expected in problem


def test_speculative_cross_field_checks():
    data = _local()
    spec = data["pools"]["decode"]["speculative"]
    spec.update(method="draft", num_speculative_tokens=3)
    assert "draft_model is required" in _problems(data)[0]
    spec.update(method="ngram", ngram_min=5, ngram_max=2)
    assert "ngram_min (5) must be <= ngram_max (2)" in _problems(data)[0]
    spec.update(ngram_min=1, num_speculative_tokens=0)
    assert "num_speculative_tokens must be >= 1" in _problems(data)[0]


def test_mode_decides_pools():
    data = _local()
    data["mode"] = "colocated"
    problems = _problems(data)
    assert problems == (
        "pools.prefill: not used when mode is colocated (allowed pools: colocated)",
        "pools.decode: not used when mode is colocated (allowed pools: colocated)",
        "pools.colocated: required when mode is colocated",
    )
    data = _local()
    del data["pools"]["prefill"]
    assert _problems(data) == ("pools.prefill: required when mode is disaggregated",)


def test_cross_checks_name_paths():
    data = _local()
    data["pools"]["prefill"]["kv_cache"]["block_size"] = 32
    data["coordinator"]["max_prompt_tokens"] = 4096
    problems = _problems(data)
    assert problems[0].startswith("pools.prefill.kv_cache.block_size: must equal")
    assert problems[1].startswith("coordinator.max_prompt_tokens: must be < model.max_model_len")


def test_missing_required_and_wrong_root():
    data = _local()
    del data["model"]["name"]
    assert _problems(data) == ("model.name: Field required",)
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["not", "a", "mapping"])


def test_yaml_duplicate_keys_and_syntax(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("mode: colocated\nmode: disaggregated\n")
    with pytest.raises(ConfigError, match=r"mode: duplicate key \(line 2\)"):
        load_config(dup)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {name: x\n")
    with pytest.raises(ConfigError, match="<yaml>"):
        load_config(broken)


def test_with_overrides_revalidates():
    cfg = parse_config(_local())
    moved = cfg.with_overrides(host="0.0.0.0", port=9001, api_key="k")
    assert (moved.coordinator.host, moved.coordinator.port, moved.coordinator.api_key) == (
        "0.0.0.0",
        9001,
        "k",
    )
    assert cfg.coordinator.port == 8000  # the original is untouched
    assert moved.pools == cfg.pools
    assert cfg.with_overrides() == cfg
    with pytest.raises(ConfigError, match="coordinator.port"):
        cfg.with_overrides(port=-1)


def test_round_trip_through_dump():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert parse_config(copy.deepcopy(cfg.model_dump())) == cfg
