"""Turn pydantic validation errors into one ``ConfigError`` whose lines name key paths.

Each problem reads ``key.path: message (allowed: ...)``. The allowed values come from the schema
itself (the ``Literal`` options of a field, or the field names of a section for an unknown key), so
they cannot drift from what the loader accepts. Torch-free: the coordinator imports this.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence

from pydantic import BaseModel, ValidationError

# Cross-field checks run in a model validator at the root, where pydantic cannot attach a loc:
# they emit ready-made "key.path: message" lines, one per problem.
CROSS_CHECK_PREFIX = "Value error, "


class ConfigError(ValueError):
    """An invalid topology config. ``problems`` holds one ``key.path: message`` per problem."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid Tandem config{where}:\n{lines}")


def problems_from(error: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per pydantic error, with the key path and, where the schema has them, the
    allowed values."""
    problems: list[str] = []
    for err in error.errors():
        loc = tuple(err["loc"])
        message = str(err["msg"])
        if message.startswith(CROSS_CHECK_PREFIX):
            message = message[len(CROSS_CHECK_PREFIX) :]
        if not loc:
            # Root-level cross checks already carry their own key paths.
            problems.extend(line for line in message.splitlines() if line)
            continue
        path = ".".join(str(part) for part in loc)
        allowed = _allowed(root, loc, err["type"])
        suffix = f" (allowed: {', '.join(allowed)})" if allowed else ""
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "literal_error":
            message = f"invalid value {value!r}"
        elif err["type"] != "missing" and isinstance(value, str | int | float | bool):
            # Section-level checks get the whole mapping as input: not worth echoing.
            message = f"{message}, got {value!r}"
        problems.append(f"{path}: {message}{suffix}")
    return problems


def _allowed(root: type[BaseModel], loc: tuple, error_type: str) -> list[str]:
    owner = _section_at(root, loc[:-1])
    if owner is None:
        return []
    if error_type == "extra_forbidden":
        return list(owner.model_fields)
    field = owner.model_fields.get(str(loc[-1]))
    if field is None:
        return []
    return [str(v) for v in literal_options(field.annotation)]


def _section_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (None if the path leaves the models)."""
    current: type[BaseModel] = root
    for part in loc:
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        nested = _model_in(field.annotation)
        if nested is None:
            return None
        current = nested
    return current


def _model_in(annotation: object) -> type[BaseModel] | None:
    for candidate in _union_members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def literal_options(annotation: object) -> tuple:
    """The values of a ``Literal[...]`` annotation (also inside ``X | None``), else ()."""
    for candidate in _union_members(annotation):
        if typing.get_origin(candidate) is typing.Literal:
            return typing.get_args(candidate)
    return ()


def _union_members(annotation: object) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    if origin is typing.Annotated:
        return _union_members(typing.get_args(annotation)[0])
    return (annotation,)
