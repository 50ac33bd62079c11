"""Drafters: prompt lookup's matching against Hugging Face's PromptLookupCandidateGenerator on the
same token lists, the drafter registry, and the contract's static-shape rules."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.decoding import drafters
from jaxgen.decoding.drafters import lookup
from jaxgen.errors import JaxgenError

T, N = 24, 5


def hf_candidates(ids, num_tokens, ngram):
    import torch
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    gen = PromptLookupCandidateGenerator(num_output_tokens=num_tokens, max_matching_ngram_size=ngram, max_length=1000)
    out, _ = gen.get_candidates(torch.tensor([ids]))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("ngram", [2, 3])
def test_prompt_lookup_matches_hugging_face(ngram):
    """Our first len(HF's) drafts are HF's candidates; where HF proposes fewer than N the copy
    continues periodically; with no match (HF proposes nothing) the root is repeated."""
    rng = np.random.RandomState(ngram)
    lengths = rng.randint(1, T + 1, 400)
    rows = rng.randint(0, 4, (400, T)).astype(np.int32)  # 4 symbols: many matches, some none
    rows[::7] = np.arange(T) % 9  # some rows without repeats early on
    drafts = np.asarray(jax.jit(jax.vmap(lambda t, e: lookup.lookup_row(t, e, ngram, N)))(rows, lengths))
    kinds = set()
    for row, end, ours in zip(rows, lengths, drafts):
        ids = row[:end].tolist()
        theirs = hf_candidates(ids, N, ngram)
        if not theirs:
            assert ours.tolist() == [ids[-1]] * N, (ids, ours)
            kinds.add("none")
            continue
        assert ours[:len(theirs)].tolist() == theirs, (ids, ours, theirs)
        period = len(theirs)  # fewer than N: the candidates are the whole tail after the match
        if period < N:
            assert ours.tolist() == [theirs[j % period] for j in range(N)]
        kinds.add("full" if period == N else "short")
    assert kinds == {"none", "full", "short"}


def test_prompt_lookup_hand_cases():
    row = lambda ids: (jnp.asarray(ids + [0] * (T - len(ids)), jnp.int32), len(ids))
    lookup_row = jax.jit(lookup.lookup_row, static_argnums=(2, 3))
    draft = lambda ids, n=2: np.asarray(lookup_row(*row(ids), n, 4)).tolist()
    assert draft([5, 6, 7, 8, 5, 6]) == [7, 8, 5, 6]  # bigram (5, 6) at 0: copy 7 8, then the period
    assert draft([1, 2, 3, 9, 2, 3, 4, 2, 3]) == [9, 2, 3, 4]  # the earliest bigram match (at 1) wins
    assert draft([1, 2, 3, 4, 9, 3]) == [4, 9, 3, 4]  # no bigram (9, 3): the unigram 3 at 2
    assert draft([1, 2, 3]) == [3, 3, 3, 3]  # no match: the root repeated
    assert draft([4]) == [4, 4, 4, 4]
    assert draft([7, 7]) == [7, 7, 7, 7]  # HF: unigram 7 at 0, tail (7,), period 1
    assert draft([1, 2, 3, 4, 9, 3], n=1) == [4, 9, 3, 4]


def test_registry():
    assert "prompt_lookup" in drafters.names()
    d = drafters.get("prompt_lookup", max_matching_ngram_size=3)
    assert isinstance(d, lookup.PromptLookup) and d.max_matching_ngram_size == 3
    assert drafters.get(d) is d
    with pytest.raises(JaxgenError, match="unknown drafter 'nope'; use one of prompt_lookup"):
        drafters.get("nope")
    with pytest.raises(JaxgenError, match="bad options"):
        drafters.get("prompt_lookup", window=3)
    with pytest.raises(JaxgenError, match="already built"):
        drafters.get(d, max_matching_ngram_size=2)
    with pytest.raises(JaxgenError, match="max_matching_ngram_size=0"):
        drafters.get("prompt_lookup", max_matching_ngram_size=0)


def test_chain_drafters_are_static_and_hashable():
    d = drafters.get("prompt_lookup").configured(3, None)
    assert d.parents == (-1, 0, 1) and hash(d) == hash(drafters.get("prompt_lookup").configured(3, None))
    with pytest.raises(JaxgenError, match="drafts a chain of num_draft tokens; tree="):
        d.configured(3, (-1, 0))
    with pytest.raises(JaxgenError, match="num_draft=0 must be an integer >= 1"):
        d.configured(0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.num_draft = 2
    with pytest.raises(JaxgenError, match=r"tree\[2\]=2 must be -1"):
        drafters.check_parents((-1, 0, 2))
    assert drafters.check_parents([-1, 0, np.int64(0)]) == (-1, 0, 0)


def test_model_drafters_share_a_compile_key_and_check_the_vocabulary(tiny_cfg):
    params = {"embed": np.zeros((2, 2))}
    a = drafters.model_drafter(params, tiny_cfg).configured(2, None)
    b = drafters.model_drafter({"embed": np.ones((2, 2))}, tiny_cfg).configured(2, None)
    assert a == b and hash(a) == hash(b) and a.operands() is params  # arrays are operands, not identity
    with pytest.raises(JaxgenError, match="draft model's vocab_size=260 differs from the target's vocab_size=300"):
        a.check(dataclasses.replace(tiny_cfg, vocab_size=300))
