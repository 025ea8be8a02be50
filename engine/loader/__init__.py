"""Weight loaders: ``load_model(source, dtype) -> (ModelConfig, weights)``.

``source`` is one of
- ``builtin:smollm2-135m-instruct`` (or the bare name): a GGUF file shipped in a pip package,
- a path to a ``.gguf`` file,
- a HF transformers directory (config.json + *.safetensors, possibly sharded).

Weights are keyed by HF transformers names (see engine.model_config.ModelConfig) and have been
checked against the config: every expected tensor present with its shape, nothing extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.loader.builtin import builtin_gguf_path, builtin_name
from engine.loader.gguf_loader import load_gguf
from engine.loader.hf_loader import load_hf_dir
from engine.loader.weight_names import check_weights, expected_weight_shapes
from engine.model_config import ModelConfig
from engine.quantized_weight import QuantizedWeight

_LOADERS = {"gguf": load_gguf, "hf": load_hf_dir}

__all__ = [
    "check_weights",
    "expected_weight_shapes",
    "load_model",
    "resolve_source",
]


def resolve_source(source: str) -> tuple[str, Path, str]:
    """(kind, path, model name) for a source string; kind is "gguf" or "hf"."""
    name = builtin_name(source)
    if name is not None:
        return "gguf", builtin_gguf_path(name), name
    path = Path(source).expanduser()
    if path.is_dir():
        return "hf", path, path.name
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", path, path.stem
    raise ValueError(
        f"cannot load model source {source!r}: expected builtin:<name>, a .gguf file or a HF "
        "directory with config.json"
    )


def load_model(
    source: str, dtype: torch.dtype, quantization: str = "none"
) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantizedWeight]]:
    """Load config and weights (cast to ``dtype``) from a builtin name, GGUF file or HF dir.
    With ``quantization`` int4 / int8 a loader may return some weights as ``QuantizedWeight``
    (kept in the file's own blocks, see engine.loader.gguf_loader); the rest stay dense."""
    kind, path, name = resolve_source(source)
    return _LOADERS[kind](path, dtype, name=name, quantization=quantization)
