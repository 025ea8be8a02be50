"""What a request's output must look like (structured output), as plain torch-free data.

The coordinator builds one from the request (``response_format``, ``guided_*``,
``structured_outputs``) and checks only its shape: compiling it needs the model's vocabulary and
xgrammar (which imports torch), so that happens on the workers (``engine/structured``), where a
spec that does not compile ends the request with ``FINISH_REJECTED`` (a 400 for the client).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# json: a JSON schema; json_object: any JSON object; regex; choice: one of a list of strings;
# grammar: an EBNF grammar (xgrammar's dialect, GBNF-like, rule ``root`` first)
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """``value``: the schema as canonical JSON text (json), the pattern (regex), the grammar
    (grammar), the choices as a JSON list (choice), "" (json_object). ``strict`` (json only):
    no object property or array item the schema does not name."""

    kind: str
    value: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, "
                             f"got {self.kind!r}")  # fmt: skip
        if not isinstance(self.value, str) or not isinstance(self.strict, bool):
            raise ValueError("structured output value must be a string and strict a bool")
        if self.kind != "json_object" and not self.value:
            raise ValueError(f"a {self.kind} structured output needs a non-empty value")

    @classmethod
    def json_schema(cls, schema: dict | bool, strict: bool = True) -> StructuredOutput:
        # compact, and in the client's key order: properties are generated in schema order
        return cls("json", json.dumps(schema, separators=(",", ":")), strict)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        return cls("choice", json.dumps(list(choices)))

    @property
    def choices(self) -> list[str]:
        return json.loads(self.value)

    @property
    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar (the cache key)."""
        return self.kind, self.value, self.strict

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "strict": self.strict}

    @classmethod
    def from_dict(cls, data: dict) -> StructuredOutput:
        return cls(**data)
