"""Structured output: the llama.cpp grammar (GBNF) an answer must follow.

llama-cpp-python's converter (llama_cpp.llama_grammar) turns a JSON Schema into a
grammar, but it skips the keywords it does not know without a word, and an answer
sampled from such a grammar could break the schema. So a schema is checked first,
keyword by keyword, against what the converter honours; anything else is refused,
by its place in the schema.
"""

from __future__ import annotations

import json
import math

from llama_cpp import llama_grammar

# Any JSON object (response_format json_object): llama.cpp's own JSON grammar.
JSON_OBJECT_GRAMMAR = llama_grammar.JSON_GBNF

# Keywords that describe a value without constraining it: dropped before conversion.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# String formats the converter has a grammar for.
FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{n}" for n in range(1, 6))})
# A bounded integer becomes an enum of its values; a grammar with more alternatives
# than this slows every sampled token.
MAX_ENUMERATED_INTEGERS = 100
STRING_CHAR = r'char ::= [^"\\] |'
STRING_CHAR_JSON = r'char ::= [^"\\\x7F\x00-\x1F] |'
INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


class UnsupportedSchema(ValueError):
    """A schema the grammar cannot enforce; the message names the part."""


def grammar_for_schema(schema) -> str:
    """The GBNF grammar whose every sentence is JSON that validates against schema."""
    checked = _checked(schema, "schema")
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(checked))
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise UnsupportedSchema(f"schema: the grammar converter cannot handle it: {exc}") from None
    # The converter's string character admits raw control characters (a newline),
    # which JSON forbids inside a string; llama.cpp's JSON grammar excludes them.
    return grammar.replace(STRING_CHAR, STRING_CHAR_JSON)


def _checked(node, path: str):
    """A copy of node with annotations dropped and bounded integers enumerated;
    UnsupportedSchema for any keyword the converter would skip."""
    if not isinstance(node, dict):
        raise UnsupportedSchema(f"{path} must be a JSON Schema object.")
    node = {key: value for key, value in node.items() if key not in ANNOTATIONS}
    checked = {}
    for defs in ("$defs", "definitions"):
        if defs in node:
            if not isinstance(node[defs], dict):
                raise UnsupportedSchema(f"{path}.{defs} must be an object.")
            checked[defs] = {
                name: _checked(sub, f"{path}.{defs}.{name}") for name, sub in node.pop(defs).items()
            }
    for keyword in ("oneOf", "allOf", "not", "if", "then", "else", "pattern", "multipleOf"):
        if keyword in node:
            raise _unsupported(path, keyword)
    kind = node.get("type")

    if "$ref" in node:
        _only(node, path, "$ref")
        if not isinstance(node["$ref"], str) or not node["$ref"].startswith("#/"):
            raise UnsupportedSchema(f"{path}.$ref: only references inside the schema (#/...).")
        return {**checked, **node}
    if "anyOf" in node:
        _only(node, path, "anyOf")
        options = node["anyOf"]
        if not isinstance(options, list) or not options:
            raise UnsupportedSchema(f"{path}.anyOf must be a non-empty array of schemas.")
        options = [_checked(option, f"{path}.anyOf[{i}]") for i, option in enumerate(options)]
        return {**checked, "anyOf": options}
    if "const" in node or "enum" in node:
        # The values themselves are the grammar; "type" beside them adds nothing.
        _only(node, path, "const", "enum", "type")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise UnsupportedSchema(f"{path}.enum must be a non-empty array.")
        return {**checked, **node}
    if isinstance(kind, list):
        _only(node, path, "type")
        if not kind or not set(kind) <= TYPES:
            raise UnsupportedSchema(f"{path}.type: a list of JSON types, one or more.")
        return {**checked, **node}
    if kind is None and ({"properties", "additionalProperties", "required"} & set(node)):
        kind = "object"
    if kind is None:
        if node:
            raise UnsupportedSchema(
                f"{path}: give it a type ({', '.join(sorted(node))} alone say too little)."
            )
        return checked  # {}: the converter reads it as any object
    if kind not in TYPES:
        raise UnsupportedSchema(f"{path}.type: {kind!r} is not a JSON type.")
    return {**checked, **CHECKS[kind](node, path)}


def _only(node: dict, path: str, *allowed: str) -> None:
    for keyword in node:
        if keyword not in allowed:
            raise _unsupported(path, keyword)


def _unsupported(path: str, keyword: str) -> UnsupportedSchema:
    return UnsupportedSchema(
        f"{path}: {keyword} is not supported in structured output; "
        "the grammar could not enforce it."
    )


def _object(node: dict, path: str) -> dict:
    _only(node, path, "type", "properties", "required", "additionalProperties")
    properties = node.get("properties", {})
    if not isinstance(properties, dict):
        raise UnsupportedSchema(f"{path}.properties must be an object.")
    required = node.get("required", [])
    if not isinstance(required, list) or not set(required) <= set(properties):
        # The converter drops a required name that properties does not define.
        raise UnsupportedSchema(f"{path}.required may only name the object's properties.")
    result = {
        "type": "object",
        "properties": {
            name: _checked(sub, f"{path}.properties.{name}") for name, sub in properties.items()
        },
        "required": required,
    }
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        result["additionalProperties"] = _checked(extra, f"{path}.additionalProperties")
    elif extra is not None:
        if not isinstance(extra, bool):
            raise UnsupportedSchema(f"{path}.additionalProperties: true, false or a schema.")
        result["additionalProperties"] = extra
    return result


def _array(node: dict, path: str) -> dict:
    if "prefixItems" in node:
        _only(node, path, "type", "prefixItems")
        items = node["prefixItems"]
        if not isinstance(items, list) or not items:
            raise UnsupportedSchema(f"{path}.prefixItems must be a non-empty array of schemas.")
        return {
            "type": "array",
            "prefixItems": [_checked(s, f"{path}.prefixItems[{i}]") for i, s in enumerate(items)],
        }
    _only(node, path, "type", "items", "minItems", "maxItems")
    if "items" not in node:
        if {"minItems", "maxItems"} & set(node):
            raise UnsupportedSchema(f"{path}: minItems and maxItems need items.")
        return {"type": "array"}
    result = {**node, "items": _checked(node["items"], f"{path}.items")}
    if not result["items"]:
        # The converter reads an empty items schema as "no items"; any value is meant.
        raise UnsupportedSchema(f"{path}.items: give the items a type.")
    return result


def _string(node: dict, path: str) -> dict:
    if "format" in node:
        _only(node, path, "type", "format")
        if node["format"] not in FORMATS:
            raise _unsupported(path, f"format {node['format']!r}")
        return node
    _only(node, path, "type", "minLength", "maxLength")
    return node


def _integer(node: dict, path: str) -> dict:
    _only(node, path, "type", *INTEGER_BOUNDS)
    bounds = {key: node[key] for key in INTEGER_BOUNDS if key in node}
    if not bounds:
        return node
    for key, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsupportedSchema(f"{path}.{key} must be a number.")
    lows, highs = [], []
    if "minimum" in bounds:
        lows.append(math.ceil(bounds["minimum"]))
    if "exclusiveMinimum" in bounds:
        lows.append(math.floor(bounds["exclusiveMinimum"]) + 1)
    if "maximum" in bounds:
        highs.append(math.floor(bounds["maximum"]))
    if "exclusiveMaximum" in bounds:
        highs.append(math.ceil(bounds["exclusiveMaximum"]) - 1)
    low, high = max(lows, default=None), min(highs, default=None)
    if low is None or high is None or high - low + 1 > MAX_ENUMERATED_INTEGERS:
        raise UnsupportedSchema(
            f"{path}: {', '.join(bounds)} on an integer is supported only as a closed range "
            f"of at most {MAX_ENUMERATED_INTEGERS} values (a minimum and a maximum)."
        )
    if low > high:
        raise UnsupportedSchema(f"{path}: no integer lies within its bounds.")
    return {"enum": list(range(low, high + 1))}


def _plain(node: dict, path: str) -> dict:
    _only(node, path, "type")
    return node


CHECKS = {
    "object": _object,
    "array": _array,
    "string": _string,
    "integer": _integer,
    "number": _plain,
    "boolean": _plain,
    "null": _plain,
}
