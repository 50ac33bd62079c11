"""`Constraint`: a grammar compiled for one tokenizer, and the host-side checks of finished
rows (acceptance, the sampler-facing argument checks, the incomplete-row policy)."""
from __future__ import annotations

import flax.struct
import jax
import numpy as np

from jaxgen.constraints import automaton, backend
from jaxgen.decoding.loop import SamplerOutput
from jaxgen.errors import JaxgenError

ON_INCOMPLETE = ("error", "return")
MASK_PATHS = ("auto", "device", "host")


class Constraint:
    """A JSON schema, regex or Lark grammar compiled (by llguidance) for a jaxgen tokenizer.

    Immutable and reusable: every `generate` call opens its own matchers from it. Attributes:
    kind ("json_schema" | "regex" | "grammar"), source, tokenizer, grammar (llguidance's
    grammar text), vocab_size and eos_id (the tokenizer's), allowed_W (int32 bits of the ids a
    constraint may ever allow: non-special tokens and EOS), length_budget (keep every row
    completable within gen_length: `jaxgen.constraints.budget`, and the witness of `lave`),
    automaton (the verified device-side token automaton, `jaxgen.constraints.automaton`, that
    AR and speculative decoding use instead of host calls; None where there is none, and
    `automaton_reason` says why).

    masks: "auto" (the device automaton where it exists, else llguidance on the host), "device"
    (the automaton or a JaxgenError saying why there is none) or "host" (always the host).
    """

    def __init__(self, kind: str, source, tokenizer, *, length_budget: bool = True, masks: str = "auto"):
        if masks not in MASK_PATHS:
            raise JaxgenError(f"masks={masks!r}; use one of {', '.join(map(repr, MASK_PATHS))}")
        self.kind, self.source, self.tokenizer = kind, source, tokenizer
        self.length_budget = bool(length_budget)
        self.ll_tokenizer = backend.ll_tokenizer(tokenizer)
        self.grammar = backend.compile_grammar(kind, source, self.ll_tokenizer)
        self.vocab_size = int(self.ll_tokenizer.vocab_size)
        self.eos_id = int(tokenizer.eos_id)
        self.words = -(-self.vocab_size // 32)
        self.allowed_W = backend.allowed_words(tokenizer, self.words)
        self._template = None
        self._search_order = None  # jaxgen.constraints.budget.search_order, built on first use
        self._candidates = {}  # jaxgen.constraints.budget.Searcher: candidates per distinct mask,
        self._start_witness = {}  # and the search from the grammar's start per budget
        self.automaton, self.automaton_reason, self._on_device = None, "masks='host'", {}
        if masks != "host":
            try:
                self.automaton, self.automaton_reason = automaton.build(self), None
            except automaton.regex_dfa.Unsupported as e:
                self.automaton_reason = str(e)
                if masks == "device":
                    raise JaxgenError(f"masks='device': this {kind} has no device automaton ({e}); use "
                                      "masks='auto' or 'host' for llguidance's host-side masks") from None

    def device_automaton(self, vocab_size: int):
        """The automaton's tables for a model of `vocab_size` ids (None: host path)."""
        if self.automaton is None:
            return None
        if vocab_size not in self._on_device:
            self._on_device[vocab_size] = automaton.on_device(self.automaton, vocab_size)
        return self._on_device[vocab_size]

    def __repr__(self):
        return f"Constraint({self.kind}, {backend._shown(str(self.source))!r}, tokenizer={self.tokenizer.name})"

    def matcher(self):
        """A fresh llguidance LLMatcher at the start of the grammar (silent: errors are states); a
        copy of one built once (a copy takes microseconds, a build about half a millisecond)."""
        if self._template is None:
            self._template = backend.llguidance().LLMatcher(self.ll_tokenizer, self.grammar, log_level=0)
        return self._template.deep_copy()

    def accepts(self, generated) -> bool:
        """Whether one row's generated ids are a complete grammar string: the ids before the
        first EOS are accepted and may end there, and every id after that EOS is EOS."""
        ids = [int(t) for t in np.asarray(generated).ravel()]
        end = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
        if any(t != self.eos_id for t in ids[end:]):
            return False
        text = ids[:end] + [self.eos_id]
        return self.matcher().validate_tokens(text) == len(text)

    def text(self, generated) -> str:
        """The decoded text of one row's generated ids before the first EOS."""
        ids = [int(t) for t in np.asarray(generated).ravel()]
        return self.tokenizer.decode(ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids)


@flax.struct.dataclass
class ConstrainedOutput(SamplerOutput):
    """A constrained sampler's output: `valid` [B] bool says which rows are complete grammar
    strings (all True unless on_incomplete="return")."""
    valid: jax.Array = None


def check_constraint(constraint, cfg, eos_id, on_incomplete):
    """Refuse a constraint that does not fit the model (vocabulary, EOS) or a bad policy."""
    if not isinstance(constraint, Constraint):
        raise JaxgenError(f"constraint= takes a jaxgen.constraints.Constraint (from json_schema, regex or grammar), "
                          f"got {type(constraint).__name__}")
    if on_incomplete not in ON_INCOMPLETE:
        raise JaxgenError(f"on_incomplete={on_incomplete!r}; use one of {', '.join(map(repr, ON_INCOMPLETE))}")
    if cfg.vocab_size < constraint.vocab_size:
        raise JaxgenError(f"the constraint's tokenizer has {constraint.vocab_size} ids but the model only "
                          f"{cfg.vocab_size}; build the constraint with the model's own tokenizer")
    if eos_id != constraint.eos_id:
        raise JaxgenError(f"the constraint's tokenizer ends text with EOS id {constraint.eos_id} but the sampler "
                          f"uses {eos_id}; pass eos_id={constraint.eos_id} or use the model's tokenizer")


def check_no_policy(on_incomplete):
    if on_incomplete != "error":
        raise JaxgenError(f"on_incomplete={on_incomplete!r} applies only with constraint=")


def finish(out: SamplerOutput, constraint: Constraint, starts_B, gen_length: int,
           on_incomplete: str) -> ConstrainedOutput:
    """Check every row's generated span tokens[b, starts[b] : starts[b] + gen_length]; raise a
    JaxgenError naming the incomplete rows (on_incomplete="error"), else flag them."""
    tokens = np.asarray(out.tokens)
    starts = np.broadcast_to(np.asarray(starts_B), tokens.shape[:1])
    spans = [tokens[b, s: s + gen_length] for b, s in enumerate(starts)]
    valid = np.array([constraint.accepts(span) for span in spans])
    if on_incomplete == "error" and not valid.all():
        bad = np.nonzero(~valid)[0]
        sample = constraint.text(spans[bad[0]])
        raise JaxgenError(
            f"constrained decoding: row(s) {bad.tolist()} did not complete the {constraint.kind} within "
            f"gen_length={gen_length} tokens (row {bad[0]} ends {backend._shown(sample)[-80:]!r}); raise gen_length, "
            "or pass on_incomplete='return' to get the rows with a .valid flag")
    return ConstrainedOutput(tokens=out.tokens, nfe=out.nfe, valid=jax.numpy.asarray(valid))
