"""Llama-family decoder over a paged KV cache (RMSNorm, RoPE incl. llama3 scaling, GQA, SwiGLU).

Token-major and batch-free: every forward takes the packed tokens of all scheduled sequences,
``input_ids [N]`` and ``positions [N]``, plus an ``AttentionMetadata`` that says where each token's
K/V goes in the cache and what it attends to. Attention, norms and RoPE go through ``kernels``, so
CPU tensors run the C++ kernels (or the torch references) and CUDA tensors the Triton ones. On CPU,
a decode step runs all its layers in one C++ call (``torch.classes.tandem_cpu.DecoderStack``, per
layer the same ops in the same order, so the same bits), not ~10 a layer, where every linear takes
a kernel that call has: the int4 / int8 ones within their row limit (``Linear.max_quant_rows``: 8
rows, 64 with int8 activations, 32 beside a bfloat16 dense copy with AMX), the packed bfloat16
weight above it or in a bfloat16 model (``dense_linear``: oneDNN, or up to 128 rows our AMX tiles
on its bytes). Float32 dense layers take MKL, per op.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.attention_metadata import AttentionMetadata
from engine.huge_pages import collapse_onto_huge_pages, huge_page_copies
from engine.kv_cache import KVCache
from engine.linear import F32_DIRECT_MAX_ROWS, Linear, runs_f32_direct
from engine.model_config import ModelConfig, RopeScaling
from engine.quantized_weight import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


class RMSNorm(nn.Module):
    """HF Llama RMSNorm (float32 statistics; the normed value cast back to the input dtype before
    the weight), through the fused kernels: one pass, optionally adding the residual first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._norm, self._add_norm = kernels.rms_norm, kernels.add_rms_norm

    def bind(self, device_type: str, dtype: torch.dtype) -> None:
        self._norm = kernels.bind("rms_norm", device_type, dtype)
        self._add_norm = kernels.bind("add_rms_norm", device_type, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream and this sublayer's input."""
        return self._add_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    # on the CPU whatever the default device: under build_model's meta device the pow below
    # would run as a meta op, whose lazy imports cost ~1.5 s once per process
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
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
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * inv_freq[None]  # [P, D/2], on the CPU (rope_inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self._rotary = kernels.rotary

    def bind(self, device_type: str, dtype: torch.dtype) -> None:
        self._rotary = kernels.bind("rotary", device_type, dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated copies of q [N, Hq, D] and k [N, Hkv, D] at positions [N] (rotate-half form)."""
        return self._rotary(q, k, positions, self.cos, self.sin)


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
        self._decode_attention, self._store_kv = kernels.decode_attention, None

    def bind(self, device_type: str, dtype: torch.dtype) -> None:
        self._decode_attention = kernels.bind("decode_attention", device_type, dtype)
        store = kernels.bind("store_kv", device_type, dtype)
        self._store_kv = None if store is kernels.store_kv else store  # the C++ op: no scales

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        positions: torch.Tensor,  # [N]
        rope: RotaryEmbedding,
        md: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj.forward(x)  # [N, q_size + 2 * kv_size]: strided views, no copies
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rope(
            q.view(n, self.num_heads, self.head_dim),  # [N, Hq, D]
            k.view(n, self.num_kv_heads, self.head_dim),  # [N, Hkv, D]
            positions,
        )
        v = v.view(n, self.num_kv_heads, self.head_dim)
        k_cache, v_cache, k_scale, v_scale = kv_cache.layer(self.layer_idx)
        if self._store_kv is not None and k_scale is None and k_cache.dtype == k.dtype:
            self._store_kv(k, v, k_cache, v_cache, md.slot_mapping)
        else:  # FP8 (quantized on store) or a cache of another dtype
            kernels.store_kv(k, v, k_cache, v_cache, md.slot_mapping, k_scale, v_scale)
        if md.is_prefill:
            o = kernels.prefill_attention(
                q, k, v, md.cu_seqlens, md.max_seqlen, self.scale,
                k_cache=k_cache, v_cache=v_cache, block_tables=md.block_tables,
                context_lens=md.context_lens, k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
        else:
            o = self._decode_attention(
                q, k_cache, v_cache, md.block_tables, md.seq_lens, md.cu_seqlens,
                md.max_seqlen, self.scale, k_scale, v_scale,
            )  # fmt: skip
        return self.o_proj.forward(o.reshape(n, self.q_size))


class Embedding(nn.Module):
    """Token embeddings looked up in a [vocab, hidden] table kept as a ``Linear``'s weight, dense
    or quantized, so that a tied LM head IS this table (one copy, in whatever form it has)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.table = Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = self.table
        if t.quantized is None:
            return F.embedding(input_ids, t.weight)  # [N, hidden]
        return t.quantized.rows(input_ids).dequantize(dtype)  # only the N rows looked up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self._silu_mul = kernels.silu_mul

    def bind(self, device_type: str, dtype: torch.dtype) -> None:
        self._silu_mul = kernels.bind("silu_mul", device_type, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, 2I] -> [N, I] -> [N, H]
        return self.down_proj.forward(self._silu_mul(self.gate_up_proj.forward(x)))


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
        x = self.self_attn.forward(h, positions, rope, md, kv_cache)  # (.forward: no hooks used)
        h, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp.forward(h), residual


class LlamaForCausalLM(nn.Module):
    # CPU: the quantized kernels' weights copied onto 2 MiB pages when bound (bind_kernels);
    # False (set on the class before loading): left where they were loaded, for benchmarks
    huge_pages = True

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tied = cfg.tie_word_embeddings
        self.lm_head = self.embed_tokens.table if tied else Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)
        # a decode step runs its layers in one C++ call when their linears allow it (bind_kernels,
        # _fused_layers); False: always the per-op path (benchmarks)
        self.fuse_layers = True
        # those layers' parallel loops in one thread team (kernels/csrc/team.h) where they can;
        # False: an OpenMP region per loop (benchmarks; set_layer_team)
        self.layer_team = True
        self._fused_op: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self._decoder_stack: Callable[..., object] | None = None  # DecoderStack's constructor
        # the stacks' arguments but the caches: the norms, and each linear's weight tensors with
        # the quantized kernels' weights (steps of at most max_quant_rows rows) / the dense ones,
        # oneDNN-packed or plain float32 (larger steps, dense models); None: not fusable
        self._fused_args: tuple | None = None
        self._fused_dense_args: tuple | None = None
        self._fused_dense_rows = 1 << 30  # rows up to which the dense stack runs
        # (rows up to which every quantized linear takes its kernel, rows up to which any does)
        self._fused_rows = (0, 0)
        self._stacks: dict[tuple[int, bool], tuple[KVCache, object]] = {}  # (id(cache), dense)
        self.quantize_activations = False  # quantized CPU linears: int8 activations (load_weights)

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
        x, residual = self.embed_tokens(input_ids, self.norm.weight.dtype), None
        stack = self._fused_layers(input_ids.shape[0], md, kv_cache)
        if stack is not None:
            assert self._fused_op is not None and md.seq_lens is not None
            step = (positions, md.slot_mapping, md.block_tables, md.seq_lens, md.cu_seqlens,
                    md.max_seqlen)  # fmt: skip
            n = len(self.layers)
            # all layers in one call, unless a caller waits on each (one call per layer then)
            for begin, end in [(0, n)] if after_layer is None else [(i, i + 1) for i in range(n)]:
                x, residual = self._fused_op(stack, x, residual, begin, end, *step)
                if after_layer is not None:
                    after_layer(begin)
            return self.norm.add_forward(x, residual)[0]
        for i, layer in enumerate(self.layers):
            # .forward, not __call__: no hooks are used, and Module.__call__ costs ~2 us per call
            # (~300 module calls in a decode step)
            x, residual = layer.forward(x, residual, positions, self.rope, md, kv_cache)
            if after_layer is not None:
                after_layer(i)
        return self.norm.add_forward(x, residual)[0]

    def _fused_layers(self, rows: int, md: AttentionMetadata, kv_cache: KVCache) -> object | None:
        """The ``DecoderStack`` this step runs its layers through, or None: a decode step over a
        cache of the model dtype without FP8 scales, each linear taking the kernel the per-op path
        would (its quantized kernel up to ``Linear.max_quant_rows`` rows, its dense weight above /
        in a dense model: oneDNN-packed, or plain float32 up to ``F32_DIRECT_MAX_ROWS`` rows).
        Made on first use per cache and weight set."""
        if self._decoder_stack is None or not self.fuse_layers or md.is_prefill:
            return None
        if kv_cache.scales is not None or kv_cache.data.dtype != self.norm.weight.dtype:
            return None
        # each stack only where every linear's per-op kernel is the one it binds
        lo, hi = self._fused_rows
        if self._fused_args is not None and rows <= lo:
            dense, args = False, self._fused_args
        elif self._fused_dense_args is not None and hi < rows <= self._fused_dense_rows:
            dense, args = True, self._fused_dense_args
        else:
            return None
        cached = self._stacks.get((id(kv_cache), dense))
        if cached is None or cached[0] is not kv_cache:
            caches = [t for i in range(len(self.layers)) for t in kv_cache.layer(i)[:2]]
            cached = (kv_cache, self._decoder_stack(*args[:3], caches, *args[3:]))
            cached[1].set_team(self.layer_team)
            self._stacks[(id(kv_cache), dense)] = cached
        return cached[1]

    def set_layer_team(self, on: bool) -> None:
        """Whether the one-call decoder layers run their parallel loops in one thread team."""
        self.layer_team = on
        for _, stack in self._stacks.values():
            stack.set_team(on)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [M, vocab], float32 for sampling

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads: every linear (the LM head in full) and every
        norm; the embedding only as the LM head when tied (a lookup reads a few rows)."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        norms = [m.weight for m in self.modules() if isinstance(m, RMSNorm)]
        total = sum(m.weight_bytes for m in linears) + sum(w.nbytes for w in norms)
        untied = not self.config.tie_word_embeddings
        return total - (self.embed_tokens.table.weight_bytes if untied else 0)

    @torch.no_grad()
    def load_weights(
        self,
        weights: dict[str, Weight],
        quantization: str = "none",
        keep_dense: bool = False,
        quantize_activations: bool = False,
    ) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up. Every parameter must be covered.

        ``quantization`` int8 / int4 quantizes the layers' linears (int4 in groups of 32, int8
        per channel) and the LM head (int8 per channel in both modes: it is the largest single
        matrix and the most sensitive); weights already quantized by the loader stay as they are.
        A tied embedding shares the head's table; an untied one stays dense (a lookup reads only
        the tokens' rows). ``keep_dense``: quantized linears also keep a dense copy for large
        steps (engine/linear.py). ``quantize_activations``: the quantized linears (the LM head
        too) on CPU take int8 activations for small steps (``Linear.bind``)."""
        cfg = self.config
        self.quantize_activations = quantize_activations
        w = dict(weights)
        head_q = "none" if quantization == "none" else "int8"

        def take(name: str) -> Weight:
            if name not in w:
                raise KeyError(f"missing weight {name!r}")
            return w.pop(name)

        tied = cfg.tie_word_embeddings
        # tied: the table is the LM head (packed for oneDNN too when dense: engine/linear.py)
        self.embed_tokens.table.load(
            take("model.embed_tokens.weight"), head_q if tied else "none", pack=tied,
            keep_dense=keep_dense, lookups=True,
        )  # fmt: skip
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            linears = {
                attn.qkv_proj: cat_rows([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                attn.o_proj: take(p + "self_attn.o_proj.weight"),
                layer.mlp.gate_up_proj: cat_rows(
                    [take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
                ),
                layer.mlp.down_proj: take(p + "mlp.down_proj.weight"),
            }
            for module, weight in linears.items():
                module.load(weight, quantization, keep_dense=keep_dense)
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
        self.norm.weight.copy_(take("model.norm.weight"))
        if tied:
            w.pop("lm_head.weight", None)
        else:
            self.lm_head.load(take("lm_head.weight"), head_q, pack=True, keep_dense=keep_dense)
        if w:
            raise KeyError(f"unexpected weights: {sorted(w)[:8]}")
        self.bind_kernels()

    def bind_kernels(self) -> None:
        """Point every module at the kernels for this model's device and dtype once
        (``kernels.bind``), instead of dispatching and checking inputs on every call."""
        device_type, dtype = self.norm.weight.device.type, self.norm.weight.dtype
        for module in self.modules():
            if isinstance(module, Linear):
                module.bind(device_type, dtype, self.quantize_activations)
            elif module is not self and hasattr(module, "bind"):
                module.bind(device_type, dtype)
        if device_type == "cpu" and self.huge_pages:
            self._weights_on_huge_pages()
        self._fused_op, self._decoder_stack, self._stacks = None, None, {}
        self._fused_args = self._fused_dense_args = None
        self._fused_dense_rows = 1 << 30
        self._fused_rows = (0, 0)
        linears = [(a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
                   for a, m in ((ly.self_attn, ly.mlp) for ly in self.layers)]  # fmt: skip
        if device_type != "cpu":
            return
        from kernels import cpu_ext

        self._decoder_stack = cpu_ext.decoder_stack(dtype)  # None: no extension / dtype
        if self._decoder_stack is None:
            return
        self._fused_op = _stack_forward

        def args(weights: Callable[[Linear], list[torch.Tensor]]) -> tuple:
            """DecoderStack's arguments but the caches (inserted fourth, per cache)."""
            norms = [n.weight for ly in self.layers
                     for n in (ly.input_layernorm, ly.post_attention_layernorm)]  # fmt: skip
            per_linear = [weights(w) for ws in linears for w in ws]
            attn = self.layers[0].self_attn
            return (norms, [t for ts in per_linear for t in ts], [len(ts) for ts in per_linear],
                    self.rope.cos, self.rope.sin, self.layers[0].input_layernorm.eps, attn.scale,
                    attn.num_heads, attn.num_kv_heads)  # fmt: skip

        every = [w for ws in linears for w in ws]
        limits = [w.max_quant_rows for w in every if w.quantized is not None]
        self._fused_rows = (min(limits, default=0), max(limits, default=0))
        # int8 activations without the C++ kernel: its torch reference runs per op
        if all(w.quantized is not None and w.a8 == self.quantize_activations for w in every):
            self._fused_args = args(lambda w: [*w.kernel_tensors])
        if all(w.packed is not None for w in every):
            self._fused_dense_args = args(lambda w: [w.packed])
        # plain float32 weights: the rows our float32 kernel takes (above them MKL, per op)
        elif all(w.weight is not None and runs_f32_direct(w.weight, dtype) for w in every):
            self._fused_dense_args = args(lambda w: [w.weight])
            self._fused_dense_rows = F32_DIRECT_MAX_ROWS

    def _weights_on_huge_pages(self) -> None:
        """The quantized kernels' weight tensors (what a small step streams) copied onto 2 MiB
        pages (``engine.huge_pages``), each tensor once however many layers share it; oneDNN's
        packed weights (what our dense bfloat16 kernel streams) collapsed onto them in place.
        The plain float32 weights MKL reads are left: a float32 step on them was no faster
        (29.8 / 32.2 ms against ~30, an AMD EPYC) and collapsing them cost ~1.5 s a start."""
        every = [m for m in self.modules() if isinstance(m, Linear)]
        linears = [m for m in every if m.kernel_tensors]
        unique = {id(t): t for m in linears for t in m.kernel_tensors if t.is_contiguous()}
        copies = dict(zip(unique, huge_page_copies(list(unique.values())), strict=True))
        for m in linears:
            m.rebase_kernel_tensors(copies)
        for m in every:
            if m.packed is not None:
                mkldnn = torch.ops.mkldnn
                collapse_onto_huge_pages(mkldnn.data_ptr(m.packed), mkldnn._nbytes(m.packed))


def _stack_forward(stack, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``stack.forward(x, residual, begin, end, *step)``: the one call a fused step makes (a
    function of its own, so that tests can count the calls)."""
    return stack.forward(*args)


def cat_rows(parts: list[Weight]) -> Weight:
    """Concatenate weights along the output rows, staying quantized if every part is (same
    format); a mix is dequantized first (the layer then quantizes the whole again)."""
    if all(isinstance(p, QuantizedWeight) for p in parts):
        try:
            return QuantizedWeight.cat(parts)
        except ValueError:
            pass
    dense = [p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts]
    dtype = next((p.dtype for p in parts if isinstance(p, torch.Tensor)), torch.float32)
    return torch.cat([d.to(dtype) for d in dense], dim=0)
