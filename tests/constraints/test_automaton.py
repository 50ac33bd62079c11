"""The device-side token automaton's host half (jaxgen.constraints.automaton, regex_dfa,
json_regex): the regex compiler against Python's `re`, UTF-8 byte sequences, which JSON schemas
get tables, the check of every table against llguidance (and that it catches a wrong one), and
the fallbacks to the host path. The samplers' use of the tables is tested with the other
constrained samplers (tests/constraints/test_constraints.py, test_speculative_constrained.py)."""
import json
import random
import re

import numpy as np
import pytest

from jaxgen import constraints
from jaxgen.constraints import automaton, json_regex, regex_dfa
from jaxgen.data.tokenizers import ByteTokenizer
from jaxgen.errors import JaxgenError

TOK = ByteTokenizer()
PATTERNS = [r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)", r"(a|bbbb)c?d+", r"x*|y{2,3}", r"[^a\n]b", r".{2}", "é+[à-ÿ]?",
            r"\x41\n\t", r"(?:ab|c)+?", r"^a$", r"[-a]z", r"[]a]", r"(?P<w>[a-c]{1,3})-\(\)"]


def dfa_matches(dfa, data: bytes) -> bool:
    state = 0
    for b in data:
        state = dfa.next_SA[state, b]
        if state < 0:
            return False
    return bool(dfa.accepting_S[state])


def test_regex_dfa_matches_python_re():
    rng = random.Random(0)
    for pattern in PATTERNS:
        dfa, rx = regex_dfa.compile_regex(pattern), re.compile(pattern)
        alphabet = sorted(set(c for c in pattern if c.isprintable()) | set("abcdxyé\n\t-()@.z"))
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(7))) for _ in range(1500)]
        texts += ["ab@cd.com", "bbbbcdd", "yyy", "ée", "A\n\t", "ababc", "a", "-z", "]z", "abc-()"]
        for text in texts:
            assert dfa_matches(dfa, text.encode()) == (rx.fullmatch(text) is not None), (pattern, text)
        assert not dfa_matches(dfa, b"\xc3"), pattern  # a truncated UTF-8 sequence never matches


def test_utf8_sequences_cover_exactly_their_range():
    rng = random.Random(1)
    for lo, hi in [(0, 0x10FFFF), (0x7F, 0x800), (0xD000, 0xE000), (0xFFFF, 0x10000), (0x80, 0x80)]:
        seqs = regex_dfa.utf8_sequences(lo, hi)
        probes = [lo, hi, lo - 1, hi + 1, 0xD800, 0xDFFF] + [rng.randrange(0, 0x110000) for _ in range(300)]
        for cp in probes:
            if not 0 <= cp <= 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                continue
            data = chr(cp).encode()
            hit = any(len(s) == len(data) and all(a <= x <= b for x, (a, b) in zip(data, s)) for s in seqs)
            assert hit == (lo <= cp <= hi), (hex(lo), hex(hi), hex(cp))


@pytest.mark.parametrize("build,source,reason", [
    (constraints.regex, r"\d+", r"escape \\d"),
    (constraints.regex, r"(?i)abc", "group flags"),
    (constraints.regex, r"[[:alpha:]]", "nested classes"),
    (constraints.regex, r"[a-z]{5000}", "states"),
    (constraints.json_schema, {"type": "object"}, "additionalProperties"),
    (constraints.json_schema, {"type": "string", "format": "date"}, "format"),
    (constraints.grammar, 'start: "a"+', "host matchers"),
])
def test_unsupported_constraints_keep_the_host_path(build, source, reason):
    c = build(source, TOK)
    assert c.automaton is None and c.device_automaton(260) is None and re.search(reason, c.automaton_reason)
    with pytest.raises(JaxgenError, match="masks='device': this .* has no device automaton"):
        build(source, TOK, masks="device")
    assert build(source, TOK, masks="host").automaton_reason == "masks='host'"


def test_unknown_mask_path_is_refused():
    with pytest.raises(JaxgenError, match="masks='gpu'; use one of 'auto', 'device', 'host'"):
        constraints.regex("a", TOK, masks="gpu")


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}},
     "required": ["name", "age", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"}, "c": {"enum": ["x", 1, None]}},
     "additionalProperties": False},
    {"type": "object", "properties": {"lo": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "up": {"type": "integer", "minimum": 3},
                                      "neg": {"type": "integer", "exclusiveMaximum": -2}},
     "required": ["lo", "up", "neg"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3},
    {"type": "string", "pattern": "[a-z]{2}"},
    {"anyOf": [{"type": "null"}, {"const": True}]},
    {"type": ["string", "null"], "maxLength": 2},
]
TEXTS = ['{"name":"ab","age":7,"ok":true}', '{"age":7,"name":"ab","ok":true}', '{"name":"abcdef","age":7,"ok":true}',
         '{"name":"a\\"b","age":99,"ok":false}', '{"name":"","age":100,"ok":true}', '{}', '{"a":-0,"c":null}',
         '{"b":1.5e3}', '{"a":01}', '{"lo":-0,"up":1234,"neg":-3}', '{"lo":6,"up":3,"neg":-3}',
         '{"lo":0,"up":3,"neg":-2}', '["ab","\\u001f"]', '[]', '["abcd"]', '"1xy2"', '"x1y"', 'null', 'true', 'false',
         '"ab"', 'nul']


def token_walk(tables, ids) -> bool:
    """Whether the table takes `ids` then EOS and ends finished."""
    state = 0
    for t in list(ids) + [TOK.eos_id]:
        state = tables.next_SV[state, t]
        if state < 0:
            return False
    return state == tables.states - 1


def test_json_schemas_get_tables_that_accept_what_llguidance_accepts():
    for schema in SCHEMAS:
        c = constraints.json_schema(schema, TOK, masks="device")  # built: every state agreed with llguidance
        for text in TEXTS:
            ids = list(text.encode())
            assert token_walk(c.automaton, ids) == c.accepts(ids + [TOK.eos_id]), (json.dumps(schema), text)
    assert json_regex.schema_regex({"type": "integer", "minimum": 0, "maximum": 12}) == "(?:(?:[0-9]|1(?:[0-2])))"


def test_the_check_against_llguidance_rejects_a_wrong_table(monkeypatch):
    schema = {"type": "string", "maxLength": 3}
    assert constraints.json_schema(schema, TOK).automaton is not None
    monkeypatch.setattr(json_regex, "STRING_CHAR", "[a-z]")  # a string language llguidance does not have
    c = constraints.json_schema(schema, TOK)
    assert c.automaton is None and "differs from llguidance" in c.automaton_reason


def test_tables_are_padded_to_shared_shapes_and_refuse_specials():
    small, json_c = constraints.regex("ab?", TOK), constraints.json_schema(SCHEMAS[0], TOK)
    a, b = small.device_automaton(300), json_c.device_automaton(300)
    assert a.next_SV.shape == b.next_SV.shape == (256, 300)  # one compiled program serves both
    table = np.asarray(b.next_SV)
    assert (table[:, 256:] < 0).sum() == table[:, 256:].size - (table[:, TOK.eos_id] >= 0).sum()  # EOS only
    finished = json_c.automaton.states - 1
    assert table[finished, TOK.eos_id] == finished and (np.delete(table[finished], TOK.eos_id) < 0).all()
    need = np.asarray(b.need_S)
    assert need[0] == len('{"name":"","age":0,"ok":true}') + 1  # the shortest JSON text, then EOS
    assert automaton.build(small).states == 4  # start, after "a", after "ab", finished
