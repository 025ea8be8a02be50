"""Llama-family decoder over a paged KV cache (RMSNorm, RoPE incl. llama3 scaling, GQA, SwiGLU).

Token-major and batch-free: every forward takes the packed tokens of all scheduled sequences,
``input_ids [N]`` and ``positions [N]``, plus an ``AttentionMetadata`` that says where each token's
K/V goes in the cache and what it attends to. Attention goes through the ``kernels`` dispatch, so
CPU tensors run the torch references and CUDA tensors run the Triton kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

import kernels
from engine.attention_metadata import AttentionMetadata
from engine.kv_cache import KVCache
from engine.linear import Linear
from engine.model_config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """HF Llama RMSNorm (float32 statistics; the normed value cast back to the input dtype before
    the weight), through the fused kernels: one pass, optionally adding the residual first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream and this sublayer's input."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin table for every position, computed once in float32 the way HF computes it."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated copies of q [N, Hq, D] and k [N, Hkv, D] at positions [N] (rotate-half form)."""
        return kernels.rotary(q, k, positions, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul (weights concatenated at load time)
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        positions: torch.Tensor,  # [N]
        rope: RotaryEmbedding,
        md: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [N, q_size + 2 * kv_size]: strided views below, no copies
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rope(
            q.view(n, self.num_heads, self.head_dim),  # [N, Hq, D]
            k.view(n, self.num_kv_heads, self.head_dim),  # [N, Hkv, D]
            positions,
        )
        v = v.view(n, self.num_kv_heads, self.head_dim)
        k_cache, v_cache, k_scale, v_scale = kv_cache.layer(self.layer_idx)
        kernels.store_kv(k, v, k_cache, v_cache, md.slot_mapping, k_scale, v_scale)
        if md.is_prefill:
            o = kernels.prefill_attention(
                q, k, v, md.cu_seqlens, md.max_seqlen, self.scale,
                k_cache=k_cache, v_cache=v_cache, block_tables=md.block_tables,
                context_lens=md.context_lens, k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        else:
            o = kernels.decode_attention(
                q, k_cache, v_cache, md.block_tables, md.seq_lens, md.cu_seqlens,
                md.max_seqlen, self.scale, k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        return self.o_proj(o.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))  # [N, 2I] -> [N, I] -> [N, H]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]: the previous layer's MLP output (layer 0: the embeddings)
        residual: torch.Tensor | None,  # [N, hidden]: the stream before x is added (layer 0: None)
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        md: AttentionMetadata,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream it is to be added to): each add
        is fused into the next RMSNorm (HF: x = x + attn(norm(x)); x = x + mlp(norm(x)))."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(h, positions, rope, md, kv_cache)
        h, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        md: AttentionMetadata,
        kv_cache: KVCache,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Returns the final hidden states [N, hidden] (normed); see ``compute_logits``.
        ``after_layer(i)`` runs once layer i's work is issued (its KV stored, on CPU; launched,
        on CUDA): a prefill worker sends finished layers' KV while the rest compute."""
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.rope, md, kv_cache)
            if after_layer is not None:
                after_layer(i)
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [M, vocab], float32 for sampling

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up. Every parameter must be covered."""
        cfg = self.config
        w = dict(weights)

        def take(name: str) -> torch.Tensor:
            if name not in w:
                raise KeyError(f"missing weight {name!r}")
            return w.pop(name)

        self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            attn.qkv_proj.weight.copy_(
                torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
            )
            attn.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
            layer.mlp.gate_up_proj.weight.copy_(
                torch.cat([take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")], dim=0)
            )
            layer.mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
        self.norm.weight.copy_(take("model.norm.weight"))
        if cfg.tie_word_embeddings:
            w.pop("lm_head.weight", None)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight.copy_(take("lm_head.weight"))
        if w:
            raise KeyError(f"unexpected weights: {sorted(w)[:8]}")
        self.lm_head.pack_onednn()  # CPU float32 only; see engine/linear.py
