"""Session fixtures shared by the model tests: the builtin GGUF, HF's own model and tokenizer
loaded from it, and a tiny random Llama saved as a HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.utils import is_accelerate_available

from engine.loader.builtin import builtin_gguf_path as _builtin_gguf_path

BUILTIN = "smollm2-135m-instruct"

# GQA (4 query heads over 2 KV heads) and head_dim 32 != hidden 64 / 4 heads, so any code that
# derives head_dim from hidden_size, or confuses query and KV heads, gets the wrong shapes.
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
)


def save_tiny_llama(directory: Path, seed: int = 0, **overrides: object) -> Path:
    """Build a random Llama with transformers (fixed seed) and save_pretrained it (safetensors)."""
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    # Norm weights are initialised to ones; make them random so a swapped norm is caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_byte_tokenizer(directory: Path) -> Path:
    """A byte-level tokenizer for the tiny Llama's 256 ids (token id = byte value, BOS = 1, EOS
    = 2), saved as tokenizer.json + tokenizer_config.json: what structured output needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte -> printable character table, as byte-level BPE vocabularies spell bytes
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = iter(range(256, 512))
    spelled = {b: chr(b if b in printable else next(others)) for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab={c: b for b, c in spelled.items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": spelled[1], "eos_token": spelled[2]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def builtin_gguf_path() -> str:
    return str(_builtin_gguf_path(BUILTIN))


@pytest.fixture(scope="session")
def hf_smollm2(builtin_gguf_path: str) -> transformers.PreTrainedModel:
    """transformers' LlamaForCausalLM dequantized from the same GGUF, float32, eval mode."""
    path = Path(builtin_gguf_path)
    if is_accelerate_available():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        return model.eval()
    # from_pretrained(gguf_file=...) refuses to run without `accelerate` (not installed here),
    # but for llama it only gates transformers' legacy GGUF import, which we call directly:
    # the same config parsing, dequantization, renaming and Q/K un-permutation.
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with no_init_weights():  # every parameter is overwritten below; skip the random init
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    tied = ["lm_head.weight"] if config.tie_word_embeddings else []
    assert result.missing_keys == tied, result.missing_keys
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(builtin_gguf_path: str) -> transformers.PreTrainedTokenizerBase:
    path = Path(builtin_gguf_path)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama (tied embeddings, GQA, head_dim != hidden / heads)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def make_tiny_llama():
    """``save_tiny_llama(directory, seed=0, **LlamaConfig overrides) -> directory``."""
    return save_tiny_llama
