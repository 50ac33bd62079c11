"""Constrained decoding (jaxgen.constraints): building constraints, host masks, and 100% valid
outputs of the AR, masked-diffusion and block-diffusion samplers from an untrained tiny model.

Every sampler test draws with temperature (random tokens), so only the masks and the LAVE
verification make the rows valid. Shapes are shared between tests so each program compiles once.
"""
import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config, constraints, model
from jaxgen.constraints import backend, budget, device, host_call, lave, sessions
from jaxgen.data.tokenizers import ByteTokenizer, HFTokenizer
from jaxgen.errors import JaxgenError
from jaxgen.samplers import ar, block_diffusion, masked_diffusion

TOK = ByteTokenizer()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
PATTERN = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
LARK = 'start: greeting " " NAME "!"\ngreeting: "hi" | "hello"\nNAME: /[a-z]{1,6}/\n'
GREETING = re.compile(r"(hi|hello) [a-z]{1,6}!")
GEN = 40
SPECIALS = (TOK.bos_id, TOK.pad_id, TOK.mask_id)


@pytest.fixture(scope="module")
def tiny():
    cfg = config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64, max_seq_len=64)
    return cfg, model.init(dataclasses.replace(cfg, init_std=0.5), jax.random.key(0))


@pytest.fixture(scope="module")
def json_c():
    return constraints.json_schema(SCHEMA, TOK)


@pytest.fixture(scope="module")
def regex_c():
    return constraints.regex(PATTERN, TOK)


def generated(out, start, n=GEN):
    return [np.asarray(row)[s: s + n] for row, s in zip(out.tokens, np.broadcast_to(start, out.tokens.shape[:1]))]


def text_of(ids):
    ids = list(ids)
    return TOK.decode(ids[: ids.index(TOK.eos_id)] if TOK.eos_id in ids else ids)


def assert_json_rows(rows):
    for ids in rows:
        assert not set(SPECIALS) & set(ids.tolist())
        value = json.loads(text_of(ids))
        assert set(value) == {"name", "age", "ok"} and len(value["name"]) <= 5 and 0 <= value["age"] <= 99
        assert isinstance(value["ok"], bool)


def assert_regex_rows(rows, pattern=PATTERN):
    for ids in rows:
        assert re.fullmatch(pattern, text_of(ids)), text_of(ids)
        end = list(ids).index(TOK.eos_id) if TOK.eos_id in ids else len(ids)
        assert (ids[end:] == TOK.eos_id).all()


# building constraints


def test_a_foreign_tokenizer_is_refused():
    with pytest.raises(JaxgenError, match="ByteTokenizer or HFTokenizer; get one with jaxgen.data.tokenizers"):
        constraints.regex("a+", object())


@pytest.mark.parametrize("build,message", [
    (lambda: constraints.regex("[a-z", TOK), r"regex does not compile: .*unclosed character class.*\n  regex: \[a-z"),
    (lambda: constraints.grammar("start: foo\n", TOK), r"Lark grammar does not compile: .*unknown name: \"foo\""),
    (lambda: constraints.json_schema({"type": "objekt"}, TOK), r"JSON schema does not compile: .*objekt"),
    (lambda: constraints.json_schema("{not json", TOK), r"JSON schema is not valid JSON .*\{not json"),
])
def test_compile_errors_carry_the_back_end_message_and_the_source(build, message):
    with pytest.raises(JaxgenError, match="(?s)" + message):
        build()


def test_missing_llguidance_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(JaxgenError, match=r"pip install 'jaxgen\[constraints\]'"):
        constraints.regex("a+", TOK)


def test_special_tokens_other_than_eos_are_never_allowed():
    c = constraints.grammar('start: <bos> "a" | "b" /.*/\n', TOK)  # the grammar itself names BOS
    with constraints.open_session(c, 1, 8, 264) as s:  # a model vocabulary wider than the tokenizer's
        allowed = backend.unpack_bits(s.fill_masks(), 264)[0]
        assert allowed[ord("b")] and not allowed[list(SPECIALS) + [260, 263]].any()
        s.consume(0, [ord("b")])
        allowed = backend.unpack_bits(s.fill_masks(), 264)[0]
        assert allowed[TOK.eos_id] and allowed[ord("z")] and not allowed[list(SPECIALS)].any()


def test_batched_fill_on_the_thread_pool_matches_the_row_by_row_fill(monkeypatch, json_c):
    def masks_after(prefixes):
        with constraints.open_session(json_c, len(prefixes), 16, 260) as s:
            for b, text in enumerate(prefixes):
                s.consume(b, text.encode())
            return s.fill_masks()

    prefixes = ['{"name":"a', "{", '{"name":"",']
    row_by_row = masks_after(prefixes)
    monkeypatch.setattr(sessions, "PAR_FILL_MIN_VOCAB", 0)
    np.testing.assert_array_equal(masks_after(prefixes), row_by_row)


def test_device_unpack_matches_the_host_layout():
    bits_BV = np.random.RandomState(0).rand(3, 70) < 0.5
    words = backend.pack_bits(np.pad(bits_BV, ((0, 0), (0, 26))))
    np.testing.assert_array_equal(np.asarray(device.unpack(jnp.asarray(words), 70)), bits_BV)
    np.testing.assert_array_equal(backend.unpack_bits(words, 70), bits_BV)


def test_hf_tokenizer_constraint(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(['{"a": 12, "b": "xyz"}'] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|mask|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    c = constraints.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                                 "additionalProperties": False}, tok)
    assert c.accepts(list(tok.encode('{"a":12}')) + [tok.eos_id, tok.eos_id])
    assert not c.accepts(tok.encode('{"a":12')) and not c.accepts(tok.encode('{"b":1}'))
    with constraints.open_session(c, 1, 8, tok.vocab_size) as s:
        allowed = backend.unpack_bits(s.fill_masks(), tok.vocab_size)[0]
        assert allowed.any() and not allowed[[tok.bos_id, tok.mask_id, tok.token_id("<unk>")]].any()
        assert all(tok.token(i).startswith("{") for i in np.flatnonzero(allowed))
    # where the grammar forces bytes ('{"a":'), llguidance allows only their canonical first token
    # ('{"', not '{'); the tables do not model that rule, their check finds it: the host path stays
    assert c.automaton is None and "differs from llguidance" in c.automaton_reason
    words = constraints.regex(r"[ab]{1,3}x|(yes|no)", tok)  # nothing forced: multi-byte tokens agree
    assert words.automaton is not None
    for text in ("abx", "ax", "yes", "no", "abab", "ye", "bbbx"):
        ids, state = list(tok.encode(text)) + [tok.eos_id], 0
        for t in ids:
            state = words.automaton.next_SV[state, t] if state >= 0 else -1
        assert (state == words.automaton.states - 1) == words.accepts(ids), text


# host pieces


def test_tree_masks_walk_every_path_and_roll_back():
    c = constraints.regex("(ab|ac)d", TOK)
    a, b, cc, d, x = map(ord, "abcdx")
    chunk = jnp.asarray([[65, a, b, cc, d, x, d, TOK.eos_id]], jnp.int32)
    parents = (-1, 0, 1, 1, 2, 0, 5, 4)  # root > a > {b > d > EOS, c}; root > x (off the grammar) > d
    allowed = lambda m: [np.flatnonzero(row).tolist() for row in backend.unpack_bits(np.asarray(m)[0], 260)]  # noqa
    with constraints.open_session(c, 1, 8, 260) as s:
        tree = jax.jit(lambda sid, ch: device.tree_masks(sid, ch, parents, 9))
        masks = allowed(tree(jnp.int32(s.id), chunk))
        assert masks == [[a], [b, cc], [d], [d], [TOK.eos_id], [], [], [TOK.eos_id]]
        assert allowed(tree(jnp.int32(s.id), chunk)) == masks  # the walk left the matchers unchanged
        after = device.advance(jnp.int32(s.id), jnp.asarray([[a, cc]]), jnp.asarray([2]), 9)
        assert np.flatnonzero(backend.unpack_bits(np.asarray(after), 260)[0]).tolist() == [d]
    with pytest.raises(ValueError, match="earlier parent"):
        device.tree_masks(jnp.int32(0), chunk, (-1, 0, 3, 1, 2, 0, 5, 4), 9)


def test_lave_row_step_verifies_fills_and_falls_back_to_the_witness():
    c = constraints.regex("abcd", TOK)
    M, E = TOK.mask_id, TOK.eos_id
    a, b, cc, d, z = map(ord, "abcdz")
    m, searcher = c.matcher(), budget.Searcher(c)
    row, = lave.new_rows(1, m, searcher, 6)

    def step(block, proposal, candidates):
        return lave.RowStep(row, m, searcher, gen_length=6, eos=E).verdict(
            0, np.array(block), np.array(proposal), np.array(candidates, bool), M)

    assert row.budgeted and row.witness == [a, b, cc, d]  # a completion within 6 tokens: a length budget
    # the fill "azcd" fails, the witness agrees at d: d commits
    commit, tokens = step([M] * 6, [a, z, cc, d, E, E], [0, 1, 0, 1, 0, 0])
    assert row.budgeted and commit.tolist() == [0, 0, 0, 1, 0, 0] and row.witness == [a, b, cc, d]
    # "z" at 0 breaks every fill and disagrees with the witness: fallback, the witness's "a" at the frontier
    commit, tokens = step(np.where(commit, tokens, M), [z, b, z, d, E, E], [1, 0, 1, 0, 0, 0])
    assert commit.tolist() == [1, 0, 0, 0, 0, 0] and tokens[0] == a and row.frontier == 1 and row.witness == [b, cc, d]
    # the lookahead fill "bc" + committed "d" + EOS... is valid: every candidate commits, z past EOS becomes EOS
    commit, tokens = step([a, M, M, d, M, M], [a, b, cc, d, E, z], [0, 1, 1, 0, 1, 1])
    assert commit.tolist() == [0, 1, 1, 0, 1, 1] and tokens.tolist() == [a, b, cc, d, E, E] and row.complete
    assert lave.valid_prefix(c.matcher(), [a, b, E], E) is False and lave.valid_prefix(c.matcher(), [a, b], E)


def test_witness_search_completes_json_and_regex():
    for c, text in [(constraints.json_schema(SCHEMA, TOK), '{"name":"'), (constraints.regex(PATTERN, TOK), "ab")]:
        m = c.matcher()
        m.consume_tokens(list(text.encode()))
        found = budget.Searcher(c).complete_within(m, 40)
        assert found is not None and c.accepts(list(text.encode()) + found)
        assert m.validate_tokens(found) == len(found)  # the search left the matcher where it was
        assert budget.Searcher(c).complete_within(m, 2) is None


def test_length_budget_forces_and_replaces_tokens_near_the_end():
    a, b, cc = map(ord, "abc")
    c = constraints.regex("ab(cdefgh)?", TOK)
    m, rows = c.matcher(), budget.Budget(c, 1, 4)
    rows.start(m)
    assert rows.witness == [[a, b]] and rows.forced(0) is None  # 2 spare slots: free under the mask
    assert rows.commit(0, m, a) == a and rows.commit(0, m, b) == b
    assert rows.commit(0, m, cc) == TOK.eos_id  # "cdefgh" needs 6 tokens, 2 slots are left: EOS instead
    tight = constraints.regex("[a-z]{3}", TOK)
    m, rows = tight.matcher(), budget.Budget(tight, 1, 3)
    rows.start(m)
    assert rows.forced(0) == rows.witness[0][0]  # no slack: the mask allows the witness's token only


def test_host_call_fallback_gives_the_same_results(monkeypatch):
    calls = []

    def host(x):
        calls.append(int(x.sum()))
        return (np.asarray(x) * 2,)

    def run(x):
        return jax.lax.fori_loop(0, 3, lambda i, v: host_call.host_call(host, [jax.ShapeDtypeStruct((2,), jnp.int32)],
                                                                        v)[0], x)

    fast = jax.jit(run)(jnp.asarray([1, 2], jnp.int32))
    monkeypatch.setattr(host_call, "USE_IO_CALLBACK", True)
    slow = jax.jit(run)(jnp.asarray([1, 2], jnp.int32))
    np.testing.assert_array_equal(fast, [8, 16]) and np.testing.assert_array_equal(slow, fast)
    assert calls == [3, 6, 12] * 2


# AR


@pytest.mark.parametrize("masks", ["device", "host"])
def test_ar_json_regex_and_lark_rows_are_all_valid(tiny, masks):
    cfg, params = tiny
    json_c, regex_c = constraints.json_schema(SCHEMA, TOK, masks=masks), constraints.regex(PATTERN, TOK, masks=masks)
    prompt = jnp.asarray([[256, 72, 105]], jnp.int32)
    run = lambda c, seed: ar.generate(params, cfg, prompt, jax.random.key(seed), gen_length=GEN,  # noqa: E731
                                      temperature=1.0, constraint=c)
    assert_json_rows(generated(run(json_c, 0), 3))
    compiled = ar._generate._cache_size()
    for seed in range(3):
        assert_json_rows(generated(run(json_c, seed), 3))
        assert_regex_rows(generated(run(regex_c, seed), 3))
        out = run(constraints.grammar(LARK, TOK), seed)  # no automaton for Lark: the host path
        assert out.valid.all() and GREETING.fullmatch(text_of(generated(out, 3)[0]))
    assert_regex_rows(generated(run(constraints.regex(PATTERN, TOK, length_budget=False, masks=masks), 0), 3))
    # one program serves every constraint of these shapes (device tables: of the same padded size)
    assert ar._generate._cache_size() == compiled + (masks == "device") * 2  # + Lark's host program, + no budget


def test_ar_ragged_batch(tiny, regex_c):
    cfg, params = tiny
    prompt = jnp.asarray([[256, 72, 105, 33], [256, 65, 258, 258], [256, 258, 258, 258]], jnp.int32)
    lengths = np.array([4, 2, 1])
    out = ar.generate(params, cfg, prompt, jax.random.key(1), gen_length=GEN, temperature=1.0, top_k=50,
                      prompt_lengths=lengths, constraint=regex_c)
    assert_regex_rows(generated(out, lengths))
    assert (np.asarray(out.tokens)[2, 1 + GEN:] == cfg.pad_id).all()


def test_ar_unsatisfiable_constraint_raises_or_flags(tiny):
    cfg, params = tiny
    c = constraints.regex("a{60}", TOK)
    prompt = jnp.asarray([[256, 72, 105]], jnp.int32)
    with pytest.raises(JaxgenError, match=r"row\(s\) \[0\] did not complete the regex within gen_length=40"):
        ar.generate(params, cfg, prompt, jax.random.key(0), gen_length=GEN, constraint=c)
    out = ar.generate(params, cfg, prompt, jax.random.key(0), gen_length=GEN, constraint=c, on_incomplete="return")
    assert not out.valid[0] and text_of(generated(out, 3)[0]) == "a" * GEN
    with pytest.raises(JaxgenError, match="on_incomplete"):
        ar.generate(params, cfg, prompt, jax.random.key(0), gen_length=4, on_incomplete="return")
    with pytest.raises(JaxgenError, match="EOS id 257 but the sampler uses 3"):
        ar.generate(params, cfg, prompt, jax.random.key(0), gen_length=4, constraint=c, eos_id=3)


def test_unconstrained_and_device_mask_programs_hold_no_host_call(tiny, regex_c):
    cfg, params = tiny
    program = lambda p, session: ar._generate(  # noqa: E731
        p, cfg, jnp.ones((1, 3), jnp.int32), jnp.full((1,), 3), jax.random.key(0), 0.0, 0, 1.0, 257, session,
        max_new_tokens=4, stop_at_eos=True, greedy=True, ragged=False)
    assert "jaxgen_host_call" in str(jax.make_jaxpr(program)(params, jnp.int32(0)))
    assert "host_call" not in str(jax.make_jaxpr(program)(params, None))
    assert "host_call" not in str(jax.make_jaxpr(program)(params, regex_c.device_automaton(cfg.vocab_size)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ar_device_masks_draw_the_host_paths_tokens(tiny, temperature):
    """Without a length budget both paths allow exactly the same ids after the same prefix
    (the tables were checked against llguidance), so they draw the same tokens."""
    cfg, params = tiny
    prompt = jnp.asarray([[256, 72, 105, 33], [256, 65, 258, 258], [256, 258, 258, 258]], jnp.int32)
    lengths = np.array([4, 2, 1])
    for build, source in [(constraints.json_schema, SCHEMA), (constraints.regex, PATTERN)]:
        outs = [ar.generate(params, cfg, prompt, jax.random.key(2), gen_length=GEN, temperature=temperature,
                            prompt_lengths=lengths, constraint=build(source, TOK, length_budget=False, masks=masks),
                            on_incomplete="return") for masks in ("device", "host")]
        np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
        np.testing.assert_array_equal(outs[0].valid, outs[1].valid)


def test_ar_device_budget_is_exact(tiny):
    """12 tokens for an e-mail address: the host budget's greedy witness search can leave a row
    without a completion (it then raises or flags it); the device tables know every state's
    shortest completion, so every row, greedy or sampled, completes."""
    cfg, params = tiny
    email = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
    prompt = jnp.asarray(np.random.default_rng(0).integers(97, 123, (8, 3)), jnp.int32)
    for temperature in (0.0, 1.0):
        out = ar.generate(params, cfg, prompt, jax.random.key(0), gen_length=12, temperature=temperature,
                          constraint=constraints.regex(email, TOK, masks="device"))
        assert_regex_rows(generated(out, 3, 12), email)


# diffusion


@pytest.mark.parametrize("options", [dict(cache=None), dict(cache="dual", threshold=0.5)])
def test_masked_diffusion_rows_are_all_valid(tiny, json_c, regex_c, options):
    cfg, params = tiny
    prompt = jnp.asarray([[256, 72, 105], [256, 65, 258]], jnp.int32)
    lengths = np.array([3, 2]) if options["cache"] else None
    run = lambda c, seed: masked_diffusion.generate(  # noqa: E731
        params, cfg, prompt, jax.random.key(seed), gen_length=GEN, steps=20, block_length=8, temperature=1.0,
        constraint=c, prompt_lengths=lengths, **options)
    starts = 3 if lengths is None else lengths
    assert_json_rows(generated(run(json_c, 0), starts))
    compiled = masked_diffusion._generate._cache_size()
    for seed in range(2):
        assert_json_rows(generated(run(json_c, seed), starts))
        assert_regex_rows(generated(run(regex_c, seed), starts))
    assert masked_diffusion._generate._cache_size() == compiled
    if lengths is not None:
        assert (np.asarray(run(regex_c, 0).tokens)[1, 2 + GEN:] == cfg.mask_id).all()  # ragged: MASK after the row


def test_masked_diffusion_refuses_modes_it_does_not_verify(tiny, regex_c):
    cfg, params = tiny
    with pytest.raises(JaxgenError, match="not with cache='dkv_decode'"):
        masked_diffusion.generate(params, cfg, jnp.ones((1, 3), jnp.int32), jax.random.key(0), gen_length=8, steps=8,
                                  block_length=8, cache="dkv_decode", constraint=regex_c)


@pytest.mark.parametrize("options", [dict(), dict(remasking="first_hitting", fuse_block_write=True)])
def test_block_diffusion_rows_are_all_valid(tiny, json_c, regex_c, options):
    cfg, params = tiny
    prompt = jnp.asarray([[256, 72, 105], [256, 65, 258]], jnp.int32)
    lengths = np.array([3, 2])
    run = lambda c, seed: block_diffusion.generate(  # noqa: E731
        params, cfg, prompt, jax.random.key(seed), gen_length=GEN, block_length=4, denoising_steps=2,
        temperature=1.0, constraint=c, prompt_lengths=lengths, **options)
    for seed in range(2):
        assert_json_rows(generated(run(json_c, seed), lengths))
        assert_regex_rows(generated(run(regex_c, seed), lengths))
    out = block_diffusion.generate(params, cfg, prompt, jax.random.key(0), gen_length=GEN, block_length=4,
                                   denoising_steps=2, constraint=constraints.regex("a{50}", TOK),
                                   prompt_lengths=lengths, on_incomplete="return", **options)
    assert not np.asarray(out.valid).any()


def test_sessions_close_after_each_call(tiny, regex_c):
    assert not sessions._SESSIONS
    with pytest.raises(JaxgenError, match="no open constraint session"):
        sessions.session(10 ** 6)
