"""The structured-output fields of a request -> one ``StructuredOutput`` (or None).

    response_format   {"type": "text"} | {"type": "json_object"}
                      | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    guided_json       a JSON schema (object, or its JSON text)      (vLLM's extensions)
    guided_regex      a regular expression
    guided_choice     a non-empty list of strings
    guided_grammar    an EBNF grammar (xgrammar's dialect)
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": ...}

At most one of them may constrain a request. Only shapes are checked here (the coordinator has
no xgrammar: it imports torch); a schema, regex or grammar that does not compile is refused by
the worker and still reaches the client as a 400 naming ``param``.
"""

from __future__ import annotations

import json

from coordinator.api_errors import bad_request
from core.structured_output import StructuredOutput

_SIMPLE = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # fmt: skip
# structured_outputs keys that change nothing here: whitespace inside JSON is never free, and
# properties a schema does not name are left out unless response_format says strict=false
_SO_NO_OPS = ("disable_any_whitespace", "disable_fallback", "disable_additional_properties")
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def parse_structured(body: dict) -> tuple[StructuredOutput | None, str | None]:
    """(spec, the request field it came from); (None, None) for free text."""
    found: list[tuple[str, StructuredOutput]] = []
    response_format = body.get("response_format")
    if response_format is not None:
        spec = _response_format(response_format)
        if spec is not None:
            found.append(("response_format", spec))
    for name, kind in _SIMPLE.items():
        if body.get(name) is not None:
            found.append((name, _spec(kind, body[name], name)))
    options = body.get("structured_outputs")
    if options is not None:
        found.append(("structured_outputs", _structured_outputs(options)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"give at most one structured-output field, got {names}", found[1][0])
    return (found[0][1], found[0][0]) if found else (None, None)


def _spec(kind: str, value: object, param: str, strict: bool = True) -> StructuredOutput:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_request(f"{param} must be a JSON schema (object)", param) from None
        if not isinstance(value, dict | bool):
            raise bad_request(f"{param} must be a JSON schema (object), got {value!r}", param)
        return StructuredOutput.json_schema(value, strict)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{param} must be a non-empty list of strings", param)
        return StructuredOutput.choice(value)
    if kind == "json_object":
        if value is not True:
            raise bad_request(f"{param} must be true", param)
        return StructuredOutput("json_object")
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string", param)
    return StructuredOutput(kind, value)


def _response_format(value: object) -> StructuredOutput | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object", param)
    kind = value.get("type")
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise bad_request(f"response_format: unknown field {extra[0]}", param)
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise bad_request(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}", param
        )
    schema = value.get("json_schema")
    if not isinstance(schema, dict) or "schema" not in schema:
        raise bad_request("response_format.json_schema must be an object with a schema", param)
    extra = sorted(set(schema) - {"name", "description", "schema", "strict"})
    if extra:
        raise bad_request(f"response_format.json_schema: unknown field {extra[0]}", param)
    strict = schema.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("response_format.json_schema.strict must be a boolean", param)
    return _spec("json", schema["schema"], param, strict=strict is not False)


def _structured_outputs(value: object) -> StructuredOutput:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object", param)
    extra = sorted(set(value) - set(_SO_KINDS) - set(_SO_NO_OPS))
    if extra:
        raise bad_request(f"structured_outputs: unknown or unsupported field {extra[0]}", param)
    for name in _SO_NO_OPS:
        if value.get(name) is not None and not isinstance(value[name], bool):
            raise bad_request(f"structured_outputs.{name} must be a boolean", param)
    kinds = [k for k in _SO_KINDS if value.get(k) is not None
             and not (k == "json_object" and value[k] is False)]  # fmt: skip
    if len(kinds) != 1:
        raise bad_request(f"structured_outputs needs exactly one of {', '.join(_SO_KINDS)}",
                          param)  # fmt: skip
    return _spec(kinds[0], value[kinds[0]], param)
