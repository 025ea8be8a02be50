"""Load a HF transformers checkpoint directory: config.json + (sharded) *.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.loader.weight_names import check_weights
from engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Buffers some older checkpoints saved alongside the parameters; recomputed by the model.
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _architecture(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    architectures = raw.get("architectures") or []
    if model_type is None and "LlamaForCausalLM" in architectures:
        return "llama"
    found = model_type if model_type is not None else architectures
    raise ValueError(
        f"unsupported architecture {found!r} in config.json; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers 5 writes ``rope_parameters`` (theta inside); 4.x wrote ``rope_theta`` and
    ``rope_scaling`` side by side. Accept both."""
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def config_from_dict(raw: dict[str, Any], name: str) -> ModelConfig:
    """ModelConfig from the parsed config.json of a Llama checkpoint."""
    arch = _architecture(raw)
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ValueError(f"config.json sets {flag}=true, which is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}; supported: silu")
    num_heads = int(raw["num_attention_heads"])
    theta, scaling = _rope(raw)
    eos = raw.get("eos_token_id")
    eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
    bos = raw.get("bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // num_heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        # LlamaConfig's default is untied
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(int(i) for i in eos_list),
        rope_scaling=scaling,
        name=name,
    )


def safetensors_files(directory: Path) -> list[Path]:
    """The shard list from the index when there is one, else the single file."""
    index = directory / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [directory / shard for shard in sorted(set(weight_map.values()))]
    if (directory / _SINGLE_FILE).is_file():
        return [directory / _SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    return found


def load_hf_dir(directory: str | Path, dtype: torch.dtype, name: str | None = None,
                quantization: str = "none") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config.json and every safetensors shard, cast to ``dtype`` (``quantization`` is
    applied by the model: nothing in a safetensors file is kept quantized)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    config = config_from_dict(json.loads(config_path.read_text()), name or directory.name)
    weights: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(directory):
        for key, tensor in load_file(str(shard)).items():
            if key.endswith(_DROPPED_SUFFIXES):
                continue
            weights[key] = tensor.to(dtype)
    # Tied checkpoints sometimes still carry a copy of the embedding as lm_head: harmless if equal.
    head = weights.get("lm_head.weight")
    embed = weights.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and embed is not None:
        if head.shape == embed.shape and torch.equal(head, embed):
            del weights["lm_head.weight"]
    check_weights(config, weights, str(directory))
    return config, weights
