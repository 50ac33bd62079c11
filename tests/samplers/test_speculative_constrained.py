"""Constrained speculative decoding (`speculative.generate(..., constraint=)`): 100% valid
JSON-schema / regex rows from an untrained model with a chain drafter (prompt lookup) and a tree
drafter (Token Recycling), greedy and sampled, batch 1 and a ragged batch; constrained greedy
output equal to constrained greedy `ar.generate` token for token (its length budget forcing
tokens included), with the device token automaton and with the host matchers; `stop_at_eos`
equal to AR's; the budget's free tokens; the argument checks.
Shapes are shared between tests so each program compiles once."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config, constraints, model
from jaxgen.constraints import budget
from jaxgen.data.tokenizers import ByteTokenizer
from jaxgen.decoding import verify
from jaxgen.errors import JaxgenError
from jaxgen.samplers import ar, speculative

TOK = ByteTokenizer()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
PATTERNS = {
    "email": r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)",
    "repeat": r"(ab|cd){1,30}x",  # prompt lookup's drafts ("abab...") are grammar-valid: accepted
    "quoted": r'"[a-z]{1,80}"',  # the model keeps writing letters: the length budget forces the quote
}
GEN = 40
RAGGED = np.array([list(b"abcdabcdab"), list(b"xyxyxy") + [TOK.pad_id] * 4, list(b'{"a') + [TOK.pad_id] * 7],
                  np.int32)
LENGTHS = np.array([10, 6, 3])
ONE = RAGGED[:1]
DRAFTERS = {"prompt_lookup": dict(drafter="prompt_lookup", num_draft=3),
            "token_recycling": dict(drafter="token_recycling", max_width=2, max_depth=3)}  # a 13-node tree


@pytest.fixture(scope="module")
def tiny():
    cfg = config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64, max_seq_len=64)
    return cfg, model.init(dataclasses.replace(cfg, init_std=0.5), jax.random.key(0))


def build_grammars(masks: str) -> dict:
    built = {name: constraints.regex(pattern, TOK, masks=masks) for name, pattern in PATTERNS.items()}
    return dict(json=constraints.json_schema(SCHEMA, TOK, masks=masks), **built)


@pytest.fixture(scope="module")
def grammars():
    """Device masks (the token automaton; every grammar here has one)."""
    return build_grammars("device")


@pytest.fixture(scope="module")
def host_grammars():
    """llguidance's host matchers, through host calls."""
    return build_grammars("host")


@pytest.fixture(scope="module")
def ar_greedy(tiny, grammars, host_grammars):
    """Constrained greedy AR tokens of the ragged batch, per mask path and grammar."""
    cfg, params = tiny
    run = lambda c: np.asarray(ar.generate(params, cfg, RAGGED, jax.random.key(0), GEN,  # noqa: E731
                                           prompt_lengths=LENGTHS, constraint=c).tokens)
    return {masks: {name: run(c) for name, c in built.items()}
            for masks, built in (("device", grammars), ("host", host_grammars))}


def spec(tiny, prompt, key=0, **kw):
    cfg, params = tiny
    return speculative.generate(params, cfg, prompt, jax.random.key(key), GEN, **kw)


def generated_text(row, start):
    ids = [int(t) for t in row[start: start + GEN]]
    end = ids.index(TOK.eos_id) if TOK.eos_id in ids else len(ids)
    assert all(t == TOK.eos_id for t in ids[end:]), "EOS, then EOS only"
    return TOK.decode(ids[:end])


def assert_valid_rows(name, tokens, starts):
    for row, start in zip(np.asarray(tokens), starts):
        text = generated_text(row, start)
        if name == "json":
            value = json.loads(text)
            assert set(value) == {"name", "age", "ok"} and len(value["name"]) <= 5 and 0 <= value["age"] <= 99
        else:
            assert re.fullmatch(PATTERNS[name], text), (name, text)


@pytest.mark.parametrize("masks", ["device", "host"])
@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_greedy_equals_constrained_greedy_ar(tiny, grammars, host_grammars, ar_greedy, drafter, masks):
    for name, c in (grammars if masks == "device" else host_grammars).items():
        out = spec(tiny, RAGGED, prompt_lengths=LENGTHS, constraint=c, **DRAFTERS[drafter])
        np.testing.assert_array_equal(np.asarray(out.tokens), ar_greedy[masks][name], err_msg=name)
        assert np.asarray(out.valid).all()
        assert_valid_rows(name, out.tokens, LENGTHS)
        assert (np.asarray(out.tokens)[2, 3 + GEN:] == TOK.pad_id).all()  # padding after a short row's output
        if drafter == "prompt_lookup" and name == "repeat":
            assert float(out.accepted) > 1.2  # drafts are accepted under the grammar masks


@pytest.mark.parametrize("drafter,prompt,lengths,warpers,masks", [
    ("prompt_lookup", ONE, None, dict(temperature=1.0, top_k=50), "device"),
    ("token_recycling", RAGGED, LENGTHS, dict(temperature=1.0), "device"),
    ("token_recycling", RAGGED, LENGTHS, dict(temperature=1.0), "host"),
])
def test_sampled_rows_are_all_valid(tiny, grammars, host_grammars, drafter, prompt, lengths, warpers, masks):
    starts = LENGTHS if lengths is not None else [prompt.shape[1]]
    for seed in range(2):
        for name in ("json", "email", "quoted"):
            c = (grammars if masks == "device" else host_grammars)[name]
            out = spec(tiny, prompt, seed, prompt_lengths=lengths, constraint=c, **DRAFTERS[drafter], **warpers)
            assert np.asarray(out.valid).all()
            assert_valid_rows(name, out.tokens, starts)


def test_incomplete_rows_raise_or_come_back_flagged(tiny):
    never = constraints.regex("a{60}", TOK)  # needs more than GEN tokens
    out = spec(tiny, RAGGED, prompt_lengths=LENGTHS, constraint=never, on_incomplete="return",
               **DRAFTERS["prompt_lookup"])
    assert not np.asarray(out.valid).any()
    assert generated_text(np.asarray(out.tokens)[0], 10) == "a" * GEN
    with pytest.raises(JaxgenError, match=r"row\(s\) \[0, 1, 2\] did not complete the regex within gen_length=40"):
        spec(tiny, RAGGED, prompt_lengths=LENGTHS, constraint=never, **DRAFTERS["prompt_lookup"])


def test_stop_at_eos_greedy_equals_ar(tiny):
    """An EOS id that the untrained model emits early in row 0: that row stops there, EOS after."""
    cfg, params = tiny
    run_ar = lambda eos: np.asarray(ar.generate(params, cfg, RAGGED, jax.random.key(0), GEN, prompt_lengths=LENGTHS,
                                                stop_at_eos=True, eos_id=eos).tokens)
    eos = int(run_ar(TOK.eos_id)[0, LENGTHS[0] + 4])
    expected = run_ar(eos)
    out = spec(tiny, RAGGED, prompt_lengths=LENGTHS, stop_at_eos=True, eos_id=eos, **DRAFTERS["prompt_lookup"])
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    first = list(expected[0, LENGTHS[0]:]).index(eos)
    assert first <= 4 and (expected[0, LENGTHS[0] + first:] == eos).all()


def test_free_tokens_commit_unchecked_whatever_they_are():
    """`Budget.free_tokens`: the next `free` tokens, any grammar-valid ones, are never replaced and
    no mask after them is forced; the budget still ends every row with the closing quote."""
    c = constraints.regex(PATTERNS["quoted"], TOK)
    rng = np.random.default_rng(0)
    letters = list(b"abcdefghijklmnopqrstuvwxyz")
    interventions = 0
    for _ in range(10):
        matcher, rows = c.matcher(), budget.Budget(c, 1, 24)
        rows.start(matcher)
        assert rows.commit(0, matcher, ord('"')) == ord('"')
        while rows.left(0) > 0 and not matcher.is_accepting():
            for _ in range(min(rows.free_tokens(0), rows.left(0))):
                token = int(rng.choice(letters))
                assert rows.forced(0) is None and rows.commit(0, matcher, token) == token
            if rows.left(0) == 0:
                break
            token = rows.forced(0) or int(rng.choice(letters))  # an AR step: forced, or free under the mask
            committed = rows.commit(0, matcher, token)
            interventions += committed != token or rows.forced(0) is not None
        assert matcher.is_accepting()
    assert interventions > 0


@pytest.mark.parametrize("parents", [verify.chain(3), (-1, -1, 0, 1)])
def test_nodes_past_free_are_neither_accepted_nor_tried(parents):
    """A target that accepts every node's token with certainty (p one-hot on each node's first
    child): with free = f, f nodes are kept and the next token is drawn from the target after
    them unchanged (the refused child's own token; a rejection's residual would exclude it)."""
    V, N = 8, len(parents)
    t = verify.tree_tables(parents)
    draft_BN = np.arange(1, N + 1)[None]  # node i (chunk row i + 1) drafts token i + 1: its chunk index
    next_C = np.maximum(t.children_CK[:, 0], 0)  # after chunk row c: its first child's token (a leaf: 0)
    p_BCV = np.eye(V)[next_C][None]
    for greedy, q_BNV in [(True, None), (False, None), (False, np.eye(V)[draft_BN])]:
        target = jnp.asarray(p_BCV.argmax(-1)) if greedy else jnp.asarray(p_BCV, jnp.float32)

        @jax.jit
        def verified(free_B, q_BNV):
            d, tg, q = speculative.untried_beyond(free_B, t.depth_C[1:], draft_BN, target, q_BNV, V, greedy=greedy)
            return verify.verify_draft(parents, d[0], tg[0], None if q is None else q[0], jax.random.key(0),
                                       greedy=greedy)

        for free in range(t.depth + 1):
            path, accepted, nxt = verified(jnp.array([free]), q_BNV)
            assert int(accepted) == free, (greedy, free)
            end = 0 if free == 0 else int(path[free - 1])
            assert int(nxt) == next_C[end], (greedy, free)


def test_unconstrained_and_device_mask_programs_hold_no_host_call(tiny, grammars):
    cfg, params = tiny
    d = speculative.configured_drafter("prompt_lookup", 3, None, cfg)
    program = lambda session: speculative._generate(  # noqa: E731
        params, cfg, jnp.ones((1, 3), jnp.int32), jnp.full((1,), 3), jax.random.key(0), speculative.target_warp(),
        None, jnp.int32(257), session, drafter=d, gen_length=4, ragged=False, stop_at_eos=session is not None)
    assert "jaxgen_host_call" in str(jax.make_jaxpr(program)(jnp.int32(0)))
    assert "host_call" not in str(jax.make_jaxpr(lambda: program(None))())
    assert "host_call" not in str(jax.make_jaxpr(program)(grammars["email"].device_automaton(cfg.vocab_size)))


def test_bad_arguments_are_refused_before_compiling(tiny, grammars, monkeypatch):
    cfg, _ = tiny
    monkeypatch.setattr(speculative, "_generate", lambda *a, **k: pytest.fail("reached the jitted decode"))
    no_eos = dataclasses.replace(cfg, eos_id=None)
    for model_cfg, kwargs, message in [
        (cfg, dict(on_incomplete="return"), "on_incomplete='return' applies only with constraint="),
        (cfg, dict(constraint=grammars["email"], on_incomplete="maybe"), "on_incomplete='maybe'; use one of"),
        (cfg, dict(constraint=grammars["email"], eos_id=3), "EOS id 257 but the sampler uses 3"),
        (cfg, dict(constraint="[a-z]+"), "constraint= takes a jaxgen.constraints.Constraint"),
        (cfg, dict(eos_id=3), "eos_id=3 does not apply without stop_at_eos=True"),
        (no_eos, dict(stop_at_eos=True), "stop_at_eos=True needs an eos_id"),
        (no_eos, dict(constraint=grammars["email"]), "pass eos_id=257"),
    ]:
        with pytest.raises(JaxgenError, match=re.escape(message)):
            speculative.generate(None, model_cfg, ONE, jax.random.key(0), 4, **kwargs)
