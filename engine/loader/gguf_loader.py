"""Load a llama.cpp GGUF file: metadata -> ModelConfig, tensors -> dequantized HF-named weights.

Matches transformers' own GGUF import (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``)
tensor for tensor: same ``gguf.quants.dequantize`` and the same undoing of the Q/K row permutation
that llama.cpp's converter applies for its rotate-half-free RoPE kernel.

With ``quantization`` int4 / int8, tensors stored as blocks our kernels run (``KEPT_BLOCKS``: Q4_1
is the ``int4`` format, Q8_0 the ``int8`` one with groups of 32) are kept as they are, as
``QuantizedWeight`` (no dequantize / requantize round trip: the same weights as the float path);
everything else is dequantized and left to the model to quantize.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from engine.loader.gguf_file import GGUFFile, read_gguf
from engine.loader.weight_names import check_weights
from engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.quantized_weight import QuantizedWeight

Q = gguf.GGMLQuantizationType
# quantization -> GGUF block types kept as QuantizedWeight
KEPT_BLOCKS: dict[str, frozenset] = {
    "none": frozenset(),
    "int8": frozenset({Q.Q8_0}),
    "int4": frozenset({Q.Q4_1, Q.Q8_0}),
}
BLOCKS = KEPT_BLOCKS["int4"]  # the block types QuantizedWeight holds (and dequantizes)

# GGUF tensor name -> HF name; per-block names are matched by _BLOCK_NAME below.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    """Rename one GGUF tensor; names we do not know pass through unchanged so the shape check
    reports them as unexpected instead of silently dropping them."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_NAME.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    return gguf_name


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute(w, n_head, n_head_kv)`` on a Q or K projection.

    llama.cpp stores each head's rows as interleaved (even, odd) pairs; HF keeps the first half
    of the head dim then the second half. Rows [num_heads * head_dim, ...] are viewed as
    [num_heads, 2, head_dim / 2] in GGUF order and as [num_heads, head_dim / 2, 2] in HF order.
    """
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # [H, D/2, 2, hidden]
    return w.swapaxes(2, 1).reshape(weight.shape)  # [H * D, hidden]


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def _rope_scaling(reader: GGUFFile, arch: str, has_rope_freqs: bool) -> None:
    """ModelConfig can express Llama-3 scaling only; GGUF stores it as a precomputed
    ``rope_freqs`` tensor without the parameters, so any scaling here is refused loudly rather
    than served with the wrong positions."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise ValueError(
            f"GGUF rope scaling type {kind!r} is not supported; load the model from a HF "
            "directory instead"
        )
    if has_rope_freqs:
        raise ValueError(
            "GGUF tensor rope_freqs.weight (Llama-3 rope scaling) is not supported: its "
            "parameters are not in the metadata; load the model from a HF directory instead"
        )


def read_config(reader: GGUFFile, name: str) -> ModelConfig:
    """Hyper-parameters from the GGUF metadata (keys prefixed with the architecture name)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF general.architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    _rope_scaling(reader, arch, "rope_freqs.weight" in tensor_names)
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    rotary_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"partial rotary ({rotary_dim} of {head_dim} dims) is not supported")
    vocab_size = _field(reader, f"{arch}.vocab_size")
    if vocab_size is None:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        rope_scaling=None,
        name=name,
    )


def quantized_blocks(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> QuantizedWeight:
    """A Q4_1 or Q8_0 tensor's raw blocks [N, K / 32 * block bytes] -> QuantizedWeight.

    Q4_1 block (20 B): float16 d, float16 m, 16 bytes of nibbles (value j low, j + 16 high);
    Q8_0 block (34 B): float16 d, 32 int8 values. (ggml-common.h, block_q4_1 / block_q8_0.)"""
    n = data.shape[0]
    head = 4 if kind == Q.Q4_1 else 2
    size = head + (16 if kind == Q.Q4_1 else 32)
    blocks = np.ascontiguousarray(data).reshape(n, -1, size)  # [N, K / 32, size]
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
    qs = torch.from_numpy(blocks[..., head:].copy()).reshape(n, -1)
    if kind == Q.Q4_1:
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        return QuantizedWeight("int4", qs.contiguous(), d.contiguous(), m.contiguous())
    return QuantizedWeight("int8", qs.view(torch.int8).contiguous(), d.contiguous())


def load_gguf(path: str | Path, dtype: torch.dtype, name: str | None = None,
              quantization: str = "none") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and weights from one GGUF file, dequantized to ``dtype`` (except the blocks
    ``quantization`` keeps, see KEPT_BLOCKS)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = read_gguf(path)
    config = read_config(reader, name or path.stem)
    keep = KEPT_BLOCKS[quantization]
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    for tensor in reader.tensors:
        heads = (config.num_heads if ".attn_q." in tensor.name
                 else config.num_kv_heads if ".attn_k." in tensor.name else None)  # fmt: skip
        if tensor.tensor_type in BLOCKS:
            qw = quantized_blocks(tensor.data, tensor.tensor_type)
            if heads is not None:
                order = unpermute_rows(np.arange(qw.shape[0]), heads)
                qw = qw.rows(torch.from_numpy(order))
            # not kept: the values gguf.quants.dequantize gives, bit for bit (the same float32
            # products and sums), over whole tensors: gguf's numpy in 16-row groups took ~1.2 s
            # of SmolLM2's float32 load. The references: a load on a GPU host must not build
            # the CPU extension.
            kept = tensor.tensor_type in keep
            weights[hf_name(tensor.name)] = qw if kept else qw.reference_values().to(dtype)
            continue
        # numpy shape is the reverse of GGUF's ne[]: [out_features, in_features] like torch
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if heads is not None:
            array = unpermute_rows(array, heads)
        # copy: F32 tensors come back as read-only views of the memory-mapped file
        weights[hf_name(tensor.name)] = torch.from_numpy(np.array(array)).to(dtype)
    check_weights(config, weights, str(path))
    return config, weights
