"""Speculative decoding: greedy output token-identical to greedy AR (prompt lookup, a draft model,
the target as its own draft, a draft tree; batched with ragged prompts), sampled output
distributed as AR sampling (chi-square over the first emitted tokens of many rows against the
exact joint on a vocabulary of 8), the K/V compaction op, and the argument checks."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxgen import config, model
from jaxgen.cache import init_cache
from jaxgen.cache.dense import gather_slots
from jaxgen.decoding import drafters, verify
from jaxgen.errors import JaxgenError
from jaxgen.samplers import ar, registry, speculative

LENGTHS = np.array([12, 5, 9, 3, 12, 7, 1, 10])
GEN = 24


@pytest.fixture(scope="module")
def ragged(tiny_cfg):
    """[8, 12] right-padded prompts with repeats (prompt lookup finds matches) and their lengths."""
    rng = np.random.RandomState(0)
    rows = np.full((len(LENGTHS), LENGTHS.max()), tiny_cfg.pad_id, np.int32)
    for r, n in enumerate(LENGTHS):
        motif = rng.randint(0, 256, rng.randint(2, 5))
        rows[r, :n] = np.resize(motif, n) if r % 2 else rng.randint(0, 256, n)
    return rows, LENGTHS


@pytest.fixture(scope="module")
def ar_greedy(tiny_cfg, tiny_params, ragged):
    prompt, lengths = ragged
    return np.asarray(ar.generate(tiny_params, tiny_cfg, prompt, jax.random.key(0), gen_length=GEN,
                                  prompt_lengths=lengths).tokens)


def spec(params, cfg, prompt, lengths, **kw):
    return speculative.generate(params, cfg, prompt, jax.random.key(3), gen_length=GEN, prompt_lengths=lengths, **kw)


def test_prompt_lookup_greedy_equals_ar(tiny_cfg, tiny_params, ragged, ar_greedy):
    prompt, lengths = ragged
    out = spec(tiny_params, tiny_cfg, prompt, lengths, drafter="prompt_lookup", num_draft=4)
    np.testing.assert_array_equal(np.asarray(out.tokens), ar_greedy)
    assert 1.0 < float(out.accepted) and int(out.nfe) <= GEN  # some drafts were accepted
    alone = speculative.generate(tiny_params, tiny_cfg, prompt[:1], jax.random.key(3), max_new_tokens=GEN)
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), ar_greedy[0])  # batch 1, HF's keyword


def test_draft_model_greedy_equals_ar(tiny_cfg, tiny_params, ragged, ar_greedy):
    """Another random model drafts (the same shapes as the next test's: one compiled program)."""
    other = jax.tree.map(lambda w: 0.8 * w + 0.4 * jnp.roll(w, 1, axis=-1), tiny_params)  # a cheap other model
    draft = drafters.model_drafter(model.decode_params(other), tiny_cfg)
    out = spec(tiny_params, tiny_cfg, *ragged, drafter=draft, num_draft=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), ar_greedy)
    assert float(out.accepted) < 1.5


def test_target_as_its_own_draft_accepts_every_draft(tiny_cfg, tiny_params, ragged, ar_greedy):
    """Every step commits num_draft + 1 tokens until the last, which is clipped at GEN."""
    K = 3
    draft = drafters.model_drafter(model.decode_params(tiny_params), tiny_cfg)  # the per-layer cache form
    out = spec(tiny_params, tiny_cfg, *ragged, drafter=draft, num_draft=K)
    np.testing.assert_array_equal(np.asarray(out.tokens), ar_greedy)
    forwards = 1 + -(-(GEN - 1) // (K + 1))  # the prefill commits one token
    assert int(out.nfe) == forwards and float(out.accepted) == pytest.approx(GEN / forwards)


@dataclasses.dataclass(frozen=True)
class OracleTree(drafters.Drafter):
    """A test tree drafter that knows the greedy continuation (its operands): at each step and
    depth it places the right token at one random sibling rank (or none), the others wrong, so
    accepted paths wander through the tree and their K/V must be gathered."""
    continuation: object = dataclasses.field(default=None, compare=False, hash=False)
    tree: tuple = (-1, -1, 0, 0, 1, 2, 2, 4, 5)

    def operands(self):
        return jnp.asarray(self.continuation)

    def configured(self, num_draft, tree):
        return self if tree is None else dataclasses.replace(self, tree=tree)

    @property
    def parents(self):
        return self.tree

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len):
        return cfg.vocab_size

    def draft(self, operands, state, tokens_BT, end_B, key):
        t = verify.tree_tables(self.tree)
        rank = np.array([t.children_CK[t.chunk_parents[c]].tolist().index(c) for c in range(1, len(self.tree) + 1)])
        depth = t.depth_C[1:]
        right = jnp.take_along_axis(operands, jnp.minimum(end_B[:, None] + depth - 1, operands.shape[1] - 1), axis=1)
        choice = jax.random.randint(key, (end_B.shape[0], t.depth), 0, t.children_CK.shape[1] + 1)
        wrong = (right + 1 + rank) % state
        return jnp.where(choice[:, depth - 1] == rank, right, wrong), None, state


def test_tree_greedy_equals_ar(tiny_cfg, tiny_params, ragged, ar_greedy):
    out = spec(tiny_params, tiny_cfg, *ragged, drafter=OracleTree(ar_greedy))
    np.testing.assert_array_equal(np.asarray(out.tokens), ar_greedy)
    assert float(out.accepted) > 1.5 and int(out.nfe) < GEN


def test_bad_arguments_are_refused_before_compiling(tiny_cfg, monkeypatch):
    monkeypatch.setattr(speculative, "_generate", lambda *a, **k: pytest.fail("reached the jitted decode"))
    prompt = np.array([[1, 2, 3]], np.int32)
    gen = lambda **kw: speculative.generate(None, tiny_cfg, prompt, jax.random.key(0), **dict(dict(gen_length=4), **kw))
    small = dataclasses.replace(tiny_cfg, vocab_size=100, mask_id=None, bos_id=None, eos_id=None, pad_id=None)
    for kwargs, message in [
        (dict(drafter="nope"), "unknown drafter 'nope'; use one of prompt_lookup"),
        (dict(num_draft=0), "num_draft=0 must be an integer >= 1"),
        (dict(drafter=drafters.model_drafter({}, small)), "draft model's vocab_size=100 differs"),
        (dict(tree=(-1, 0)), "prompt_lookup drafter drafts a chain of num_draft tokens; tree="),
        (dict(drafter=OracleTree(), tree=(-1, 1)), "tree[1]=1 must be -1"),
        (dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
        (dict(top_p=0.9), "top_p=0.9 applies only when sampling"),
        (dict(temperature=1.0, top_k=-1), "top_k=-1 must be an integer >= 0"),
        (dict(gen_length=122), "prompt length 3 + gen_length 122 + 4 draft nodes = 129 exceeds"),
        (dict(prompt_lengths=[4]), "prompt_lengths holds 4"),
        (dict(constraint=object()), "constraint= takes a jaxgen.constraints.Constraint"),
        (dict(max_new_tokens=4), "one option under two names"),
        (dict(gen_length=0), "gen_length=0 must be positive"),
    ]:
        with pytest.raises(JaxgenError) as info:
            gen(**kwargs)
        assert message in str(info.value), (kwargs, str(info.value))
    with pytest.raises(JaxgenError, match="token id 300 outside the vocabulary"):
        speculative.generate(None, tiny_cfg, np.array([[300]]), jax.random.key(0), gen_length=4)


def test_registered_with_scalar_options():
    options = registry.options("speculative")
    assert options["drafter"] == registry.Option("drafter", str, "prompt_lookup", False)
    assert options["num_draft"].type is int and "tree" not in options and "max_new_tokens" not in options
    assert registry.aliases("speculative") == {"max_new_tokens": "gen_length"}


def test_gather_slots_moves_a_path_into_contiguous_slots(tiny_cfg):
    cache = init_cache(tiny_cfg, 2, 16, per_layer=True)
    marked = lambda buf: buf + jnp.arange(16, dtype=buf.dtype)[None, None, :, None]  # slot s holds s
    cache = cache.replace(k=[marked(b) for b in cache.k], v=[marked(b) for b in cache.v])
    moved = gather_slots(cache, jnp.array([3, 5]), jnp.array([[2, 4, 2, 3, 4], [0, 1, 2, 3, 4]]))
    for buf in moved.k + moved.v:
        np.testing.assert_array_equal(buf[0, 0, :, 0], [0, 1, 2, 5, 7, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
        np.testing.assert_array_equal(buf[1, 0, :, 0], np.arange(16))
    stacked = gather_slots(cache.replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v)), 3, jnp.array([[1, 0]] * 2))
    np.testing.assert_array_equal(stacked.k[1, 1, 0, :6, 0], [0, 1, 2, 4, 3, 5])


# ---- sampling: the output distribution is the target's ----

V, PROMPT, SAMPLES = 8, [1, 2, 3, 1, 2, 3, 1], 16384


@pytest.fixture(scope="module")
def small_vocab():
    """A 1-layer model over 8 tokens and a different draft model over the same vocabulary."""
    cfg = config.ModelConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64, max_seq_len=32, mask_id=None, bos_id=None, eos_id=None, pad_id=None,
                             init_std=0.3)
    init = jax.jit(model.init, static_argnums=0)
    return cfg, init(cfg, jax.random.key(5)), init(cfg, jax.random.key(6))


def exact_joint(params, cfg, n, warp):
    """P(first n emitted tokens) of AR sampling with the warpers, by enumeration: [V] * n."""
    seqs = np.array(list(itertools.product(range(V), repeat=n)), np.int32)
    tokens = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], axis=1)
    logits, _ = jax.jit(model.forward, static_argnums=1)(params, cfg, jnp.asarray(tokens))
    probs = np.asarray(warp.probs(logits[:, len(PROMPT) - 1:-1]), np.float64)  # [S, n, V]
    joint = np.prod(np.take_along_axis(probs, seqs[:, :, None], axis=2)[..., 0], axis=1)
    return joint / joint.sum()


def assert_same_distribution(first_SN, joint):
    """Chi-square of the observed joint of the first tokens against `joint` (rare cells pooled)."""
    n = first_SN.shape[1]
    cells = np.ravel_multi_index(first_SN.T, (V,) * n)
    observed = np.bincount(cells, minlength=V ** n)
    expected = joint * len(first_SN)
    impossible = joint == 0  # cut by top-k / top-p
    assert observed[impossible].sum() == 0, "a token the warpers remove was emitted"
    rare = (expected < 5) & ~impossible
    common = ~rare & ~impossible
    obs, exp = observed[common], expected[common]
    if rare.any():
        obs, exp = np.append(obs, observed[rare].sum()), np.append(exp, expected[rare].sum())
    p_value = stats.chisquare(obs, exp).pvalue
    assert p_value > 1e-3, f"chi-square p={p_value:.2e} over {len(obs)} cells"


@dataclasses.dataclass(frozen=True)
class IidTree(drafters.Drafter):
    """A test tree drafter whose nodes are drawn iid from one fixed q (siblings independent)."""

    def configured(self, num_draft, tree):
        return self

    @property
    def parents(self):
        return (-1, -1, -1, 0, 0, 1, 3)

    def init(self, operands, cfg, prompt_BP, lengths_B, total_len):
        return None

    def draft(self, operands, state, tokens_BT, end_B, key):
        q_V = jax.nn.softmax(jnp.arange(V, dtype=jnp.float32) / 3.0)
        shape = (end_B.shape[0], len(self.parents))
        draft = jax.random.categorical(key, jnp.log(q_V), shape=shape)
        return draft, jnp.broadcast_to(q_V, shape + (V,)), state


SAMPLING = {  # name: (drafter, num_draft, warpers)
    "prompt_lookup": ("prompt_lookup", 3, dict(temperature=1.0)),
    "draft_model_filtered": ("model", 3, dict(temperature=0.7, top_k=5, top_p=0.9)),
    "tree_iid_q": (IidTree(), 1, dict(temperature=0.8)),
}  # trees with point masses: tests/decoding/test_verify.py


@pytest.mark.parametrize("case", list(SAMPLING))
def test_sampling_is_distributed_as_ar(case, small_vocab):
    cfg, params, draft_params = small_vocab
    drafter, num_draft, warpers = SAMPLING[case]
    drafter = drafters.model_drafter(draft_params, cfg) if drafter == "model" else drafter
    n = 3
    prompt = np.tile(PROMPT, (SAMPLES, 1)).astype(np.int32)
    out = speculative.generate(params, cfg, prompt, jax.random.key(11), gen_length=n, drafter=drafter,
                               num_draft=num_draft, **warpers)
    first = np.asarray(out.tokens[:, len(PROMPT):])
    assert_same_distribution(first, exact_joint(params, cfg, n, speculative.target_warp(**warpers)))
    assert 1.0 < float(out.accepted)  # drafts were accepted (and, for chi-square to pass, rejected right)
