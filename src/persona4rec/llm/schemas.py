"""Output schemas of the LLM stages and a small client-side validator.

The schemas are plain JSON Schema dictionaries so they can be sent to servers that
support ``response_format: {"type": "json_schema"}`` unchanged. Servers are free to
ignore that field, so every answer is validated here as well; the validator covers
the subset of JSON Schema that these schemas use (object, array, string, integer,
null, required, additionalProperties, minItems/maxItems, minLength, enum) and reports
the first problem with its JSON path, worded so it can be sent back to the model in
the repair turn.
"""

from __future__ import annotations

import json
import re
from typing import Any

_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaError(ValueError):
    """The model's answer does not match the stage's schema (message says where and why)."""


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """Raise :class:`SchemaError` describing the first mismatch of ``value`` against ``schema``."""
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        if not any(_TYPE_CHECKS[t](value) for t in types):
            raise SchemaError(f"{path}: expected {' or '.join(types)}, got {_describe(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{path}: expected one of {schema['enum']}, got {value!r}")
    if isinstance(value, str) and len(value.strip()) < schema.get("minLength", 0):
        raise SchemaError(f"{path}: must not be empty")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            raise SchemaError(f"{path}: missing required field(s) {missing}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                raise SchemaError(f"{path}: unexpected field(s) {extra}; allowed: {sorted(properties)}")
        for key, sub in properties.items():
            if key in value:
                validate(value[key], sub, f"{path}.{key}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise SchemaError(f"{path}: needs at least {schema['minItems']} items, got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaError(f"{path}: allows at most {schema['maxItems']} items, got {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{path}[{i}]")


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
    return f"{kind} {text[:60]}"


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """Parse the JSON value in a model answer.

    Accepts bare JSON, JSON inside a Markdown code fence, and JSON surrounded by
    prose (the outermost ``{...}`` or ``[...]`` span). Raises :class:`SchemaError`
    when no JSON value can be found, quoting the start of the text.
    """
    stripped = text.strip()
    candidates = [stripped]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for open_char, close_char in (("{", "}"), ("[", "]")):
        start, end = stripped.find(open_char), stripped.rfind(close_char)
        if 0 <= start < end:
            candidates.append(stripped[start : end + 1])
    last_error = "no JSON object found"
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as exc:
            last_error = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    raise SchemaError(f"answer is not valid JSON ({last_error}); answer starts with {stripped[:80]!r}")


def nullable_string() -> dict[str, Any]:
    return {"type": ["string", "null"]}


def aspects_schema(aspect_fields: list[dict[str, Any]]) -> dict[str, Any]:
    """Schema of one review's aspects: each field a string or null, plus ``<field>_reason`` where configured."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in aspect_fields:
        properties[field["name"]] = nullable_string()
        required.append(field["name"])
        if field.get("reason", True):
            properties[f"{field['name']}_reason"] = nullable_string()
            required.append(f"{field['name']}_reason")
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string", "minLength": 1}},
    "required": ["summary"],
    "additionalProperties": False,
}


def personas_schema(min_personas: int, max_personas: int) -> dict[str, Any]:
    """Schema of an item's personas (``{"personas": [...]}``) with the allowed count."""
    persona = {
        "type": "object",
        "properties": {
            "ID": {"type": "string"},
            "Name": {"type": "string", "minLength": 1},
            "Description": {"type": "string", "minLength": 1},
            "Preference_Rationale": {"type": "string", "minLength": 1},
        },
        "required": ["Name", "Description", "Preference_Rationale"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "personas": {"type": "array", "items": persona, "minItems": min_personas, "maxItems": max_personas}
        },
        "required": ["personas"],
        "additionalProperties": False,
    }


SELECTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "minLength": 1},
        "selection": {"type": "string", "minLength": 1},
    },
    "required": ["reasoning", "selection"],
    "additionalProperties": False,
}
