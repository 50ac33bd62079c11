"""A JSON schema as one regular expression, for the device-side token automaton.

Covers the non-recursive core of JSON Schema as llguidance compiles it in compact mode (the
automaton is checked against llguidance state by state, so a difference here only means the
host path is used): objects with `properties` (emitted in schema order, the `required` ones
mandatory, the others optional) and additionalProperties false; arrays with `items` and
min/maxItems; strings with min/maxLength or an ASCII `pattern` (JSON Schema's search semantics
unless anchored by ^...$); integers (optionally bounded); numbers without bounds; booleans;
null; enum / const; anyOf / oneOf; `type` lists. Anything else ($ref, additional properties,
formats, number bounds, ...) raises `Unsupported`.
"""
from __future__ import annotations

import json
import math
import re

from jaxgen.constraints.regex_dfa import Node, Unsupported, parse

# llguidance's JSON string character: printable ASCII but " and \, any non-ASCII scalar, the
# short escapes, or \u00XX for the control characters and DEL
STRING_CHAR = (r'(?:[\x20\x21\x23-\x5B\x5D-\x7E]|[\x{80}-\x{10FFFF}]|\\["\\bfnrt]|\\u00[01][0-9a-fA-F]'
               r'|\\u007[fF])')
RAW_UNSAFE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]  # need escapes inside a JSON string
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
HANDLED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
           "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const",
           "anyOf", "oneOf", "title", "description", "default", "examples", "$schema", "$id"}


def schema_regex(schema) -> str:
    """The regex of the compact JSON texts `schema` allows (see the module docstring)."""
    if schema is True or schema == {}:
        raise Unsupported("an unconstrained value (any JSON) is not regular")
    if not isinstance(schema, dict):
        raise Unsupported(f"schema {schema!r}")
    unknown = set(schema) - HANDLED
    if unknown:
        raise Unsupported(f"schema keywords {sorted(unknown)}")
    if "const" in schema:
        return _literal(schema["const"])
    if "enum" in schema:
        return "(?:" + "|".join(_literal(v) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            rest = {k: v for k, v in schema.items() if k != key and k not in ("title", "description")}
            if rest:
                raise Unsupported(f"{key} next to other keywords")
            return "(?:" + "|".join(schema_regex(s) for s in schema[key]) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(?:" + "|".join(schema_regex({**schema, "type": k}) for k in kind) + ")"
    build = {"object": _object, "array": _array, "string": _string, "integer": _integer, "number": _number,
             "boolean": lambda s: "(?:true|false)", "null": lambda s: "null"}.get(kind)
    if build is None:
        raise Unsupported(f"type {kind!r}")
    return build(schema)


def _literal(value) -> str:
    return re.escape(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _object(schema) -> str:
    if schema.get("additionalProperties", True) is not False:
        raise Unsupported("objects need additionalProperties: false (extra properties may hold any JSON)")
    props, required = schema.get("properties", {}), set(schema.get("required", ()))
    if required - set(props):
        raise Unsupported(f"required properties without a schema: {sorted(required - set(props))}")
    items = [(_literal(k) + ":" + schema_regex(s), k in required) for k, s in props.items()]
    memo = {}

    def after(i: int, started: bool) -> str:  # properties i.. given whether one was written
        if (i, started) not in memo:
            if i == len(items):
                memo[i, started] = ""
            else:
                text, needed = items[i]
                written = ("," if started else "") + text + after(i + 1, True)
                memo[i, started] = written if needed else f"(?:{written}|{after(i + 1, started)})"
        return memo[i, started]

    return r"\{" + after(0, False) + r"\}"


def _array(schema) -> str:
    if "items" not in schema or not isinstance(schema["items"], dict):
        raise Unsupported("arrays need one `items` schema")
    item = "(?:" + schema_regex(schema["items"]) + ")"
    lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
    if hi is not None and int(hi) == 0:
        return r"\[\]"
    more = f"{{{max(lo - 1, 0)},{'' if hi is None else int(hi) - 1}}}"
    body = f"{item}(?:,{item}){more}"
    return r"\[" + (body if lo > 0 else f"(?:{body})?") + r"\]"


def _string(schema) -> str:
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    if "pattern" not in schema:
        return f'"{STRING_CHAR}{{{lo},{"" if hi is None else int(hi)}}}"'
    if "minLength" in schema or "maxLength" in schema:
        raise Unsupported("pattern together with a length bound")
    pattern = schema["pattern"]
    head, tail = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
    inner = pattern[1 if head else 0: len(pattern) - (1 if tail else 0)]
    if _may_need_escapes(parse(inner)):
        raise Unsupported("a pattern that can match characters JSON escapes")
    return '"' + ("" if head else STRING_CHAR + "*") + f"(?:{inner})" + ("" if tail else STRING_CHAR + "*") + '"'


def _may_need_escapes(node: Node) -> bool:
    if node.kind == "set":
        return any(lo <= b and a <= hi for lo, hi in node.ranges for a, b in RAW_UNSAFE)
    return any(_may_need_escapes(p) for p in node.parts)


def _integer(schema) -> str:
    lo, hi = _integer_bounds(schema)
    if lo is None and hi is None:
        return INTEGER
    if lo is not None and hi is not None and lo > hi:
        raise Unsupported("an empty integer range")
    options = []
    if hi is None or hi >= 0:
        options.append(_naturals(max(lo or 0, 0), hi))
    if lo is None or lo < 0:  # magnitudes of the negatives; llguidance also allows "-0" then
        options.append("-" + _naturals(-hi if hi is not None and hi < 0 else 0, None if lo is None else -lo))
    return "(?:" + "|".join(options) + ")"


def _integer_bounds(schema):
    """(lowest, highest) integer allowed, None where unbounded."""
    lo = hi = None
    if "minimum" in schema:
        lo = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        lo = max(lo if lo is not None else -math.inf, math.floor(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        hi = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        hi = min(hi if hi is not None else math.inf, math.ceil(schema["exclusiveMaximum"]) - 1)
    return lo, hi


def _naturals(lo: int, hi: int | None) -> str:
    """Canonical decimal numerals (no leading zeros) of lo..hi (0 <= lo; hi None: unbounded)."""
    top = len(str(lo)) if hi is None else len(str(hi))
    parts = []
    for digits in range(len(str(lo)), top + 1):
        a, b = max(lo, 10 ** (digits - 1) if digits > 1 else 0), 10 ** digits - 1 if hi is None else min(hi, 10 ** digits - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    if hi is None:  # every longer numeral
        parts.append(f"[1-9][0-9]{{{top},}}")
    return "(?:" + "|".join(parts) + ")"


def _same_length(a: str, b: str) -> str:
    """Numerals between a and b, both with the same number of digits."""
    if a == b:
        return a
    if len(a) == 1:
        return f"[{a}-{b}]"
    if a[0] == b[0]:
        return a[0] + "(?:" + _same_length(a[1:], b[1:]) + ")"
    n = len(a) - 1
    options = [a[0] + "(?:" + _same_length(a[1:], "9" * n) + ")"]
    if int(a[0]) + 1 <= int(b[0]) - 1:
        options.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}][0-9]{{{n}}}")
    options.append(b[0] + "(?:" + _same_length("0" * n, b[1:]) + ")")
    return "(?:" + "|".join(options) + ")"


def _number(schema) -> str:
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        raise Unsupported("bounded numbers")
    return NUMBER
