"""The weights a ModelConfig implies, and the one check every loader runs before returning."""

from __future__ import annotations

import torch

from engine.model_config import ModelConfig


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF transformers name -> shape of every tensor the Llama model needs, in load order."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_rows = config.num_heads * head_dim
    kv_rows = config.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_rows, hidden)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_rows, hidden)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_rows, hidden)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, q_rows)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, config.intermediate_size)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming every missing, extra or mis-shaped tensor (all of them at once,
    so a broken checkpoint is diagnosed in one run rather than one tensor per run)."""
    expected = expected_weight_shapes(config)
    problems: list[str] = []
    missing = [name for name in expected if name not in weights]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    extra = sorted(name for name in weights if name not in expected)
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for name, shape in expected.items():
        if name in weights and tuple(weights[name].shape) != shape:
            problems.append(
                f"tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}"
            )
    if problems:
        raise ValueError(f"weights from {source} do not match the config: " + "; ".join(problems))
