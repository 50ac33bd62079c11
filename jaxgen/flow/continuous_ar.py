"""Continuous-token autoregression: the Llama backbone over real-valued tokens, with a small
flow-matching head per token (MAR's design with an FM head instead of a DDPM head; spec §3).

The backbone reads input vectors (`model.forward(..., inputs_BLE=...)`): each token x_i [D] is
projected to the model width by `params["in"]`, and the learned special vectors are rows of the
backbone's tiny embedding table (row 0 = [MASK], row 1 + c = class c, row 1 + C = the null class,
which is also the plain [BOS] of an unconditional model). The hidden state z_i at a token's
position conditions the head (`jaxgen.flow.nets`, an AdaLN residual MLP, cond_dim = hidden size,
also given the class label), which models p(x_i | z_i) as a flow from N(0, I) (t=0) to the data
(t=1), or, with `gaussian_head`, as a diagonal Gaussian from a plain MLP of z (the baseline with a
closed-form NLL).

Orders (who conditions on whom):
  causal  next-token (or next-block with block_size > 1) prediction: inputs [BOS, x_1..x_{L-1}]
          (shifted by one block), causal / block-causal layout, FM loss on every token.
  mar     MAR: a random order per row, the first n of it masked (n = ceil(L r), r ~ truncated
          N(1, 0.25^2) on [mask_ratio_min, 1], drawn per row; MAR draws one r per batch), masked
          inputs replaced by [MASK], full layout over [class | tokens], FM loss on masked tokens.
  xar     xAR's next-entity prediction with noisy context: entities are blocks of block_size
          tokens, block-causal layout over inputs shifted by one entity, and every context entity
          is noised to its own logit-normal t (fed with a time embedding) so the model learns from
          noisy context; sampling and token_nll feed clean context (t=1). Tokens inside an entity
          are conditionally independent given their z_i (the head is per token, unlike xAR's whole
          entity velocity).

The class label is dropped to the null class with probability `label_drop` during training
(classifier-free guidance). Sampling lives in `continuous_ar_sampling.sample`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts, model
from jaxgen.config import ModelConfig
from jaxgen.errors import ConfigError
from jaxgen.flow import losses, nets, solvers
from jaxgen.flow.likelihood import log_likelihood

ORDERS = ("causal", "mar", "xar")
MASK_ROW = 0  # embedding row of the [MASK] vector; class c is row 1 + c, the null class row 1 + C
LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class ContinuousARSpec:
    """A continuous-token AR model: backbone, token shape, order and head. Hashable (a static jit
    argument). The backbone's vocabulary is replaced by the special rows (see `model_cfg`)."""

    backbone: ModelConfig
    token_dim: int
    seq_len: int
    order: str = "causal"  # causal | mar | xar
    head_hidden: int = 256  # the head's NetSpec.hidden
    head_depth: int = 3  # the head's NetSpec.depth
    head_time_dim: int = 64  # the head's NetSpec.time_dim
    head_batch_mul: int = 4  # MAR's diffusion_batch_mul: (t, noise) draws per token in the loss
    gaussian_head: bool = False  # the head outputs (mean, log-std): exact Gaussian NLL baseline
    num_classes: int = 0  # > 0: class-conditional (labels 0..C-1; C is the null class)
    block_size: int = 1  # causal / xar: tokens per entity (1 = next token)
    mask_ratio_min: float = 0.7  # mar: lower end of the training mask-ratio truncated normal
    label_drop: float = 0.1  # training: P(label -> null class), for classifier-free guidance
    time_sampler: str = "uniform"  # the head's FM time sampler (jaxgen.flow.losses.T_SAMPLERS)

    def __post_init__(self):
        if not isinstance(self.backbone, ModelConfig):
            raise ConfigError(f"backbone must be a jaxgen.config.ModelConfig, got {type(self.backbone).__name__}")
        for name in ("token_dim", "seq_len", "head_hidden", "head_depth", "head_time_dim", "head_batch_mul",
                     "block_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ContinuousARSpec.{name}={value!r} must be a positive integer")
        if self.order not in ORDERS:
            raise ConfigError(f"unknown order {self.order!r}; use one of {', '.join(ORDERS)}")
        if not isinstance(self.num_classes, numbers.Integral) or self.num_classes < 0:
            raise ConfigError(f"num_classes={self.num_classes!r} must be an integer >= 0 (0: unconditional)")
        if self.order == "mar" and self.block_size != 1:
            raise ConfigError(f"block_size={self.block_size} applies to the causal / xar orders; mar unmasks by its "
                              "cosine schedule: leave block_size=1")
        if self.seq_len % self.block_size:
            raise ConfigError(f"seq_len={self.seq_len} is not a multiple of block_size={self.block_size}; "
                              "pick a block size that divides it")
        if self.positions > self.backbone.max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} needs {self.positions} positions ({self.order} order) but the "
                              f"backbone's max_seq_len is {self.backbone.max_seq_len}; raise max_seq_len or shorten "
                              "seq_len")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ConfigError(f"mask_ratio_min={self.mask_ratio_min} must lie in (0, 1] (MAR uses 0.7)")
        if not 0.0 <= self.label_drop < 1.0:
            raise ConfigError(f"label_drop={self.label_drop} must lie in [0, 1) (MAR uses 0.1)")
        losses.t_sampler(self.time_sampler)  # names the valid samplers when unknown

    @property
    def positions(self) -> int:
        """Backbone positions one forward uses: mar prefixes a class token."""
        return self.seq_len + (self.order == "mar")

    @property
    def num_entities(self) -> int:
        return self.seq_len // self.block_size

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def model_cfg(self) -> ModelConfig:
        """The backbone with a vocabulary of the special rows only: [MASK], C classes, null/[BOS]."""
        return dataclasses.replace(self.backbone, vocab_size=self.num_classes + 2, mask_id=MASK_ROW, bos_id=None,
                                   eos_id=None, pad_id=None, tie_embeddings=True)

    @property
    def head(self) -> nets.NetSpec:
        """The flow head: an AdaLN velocity net over token_dim conditioned on z (and the label).
        (The Gaussian head is a plain MLP of the same width and depth, see `gaussian_init`.)"""
        return nets.NetSpec(dim=self.token_dim, hidden=self.head_hidden, depth=self.head_depth,
                            time_dim=self.head_time_dim, num_classes=self.num_classes,
                            cond_dim=self.backbone.hidden_size)

    def layout(self):
        if self.order == "mar":
            return layouts.full()
        return layouts.causal() if self.block_size == 1 else layouts.block_causal(self.block_size)


# ---- params ----

def _dense(key, n_in: int, n_out: int) -> dict:
    return {"w": jax.random.normal(key, (n_in, n_out), jnp.float32) / math.sqrt(n_in),
            "b": jnp.zeros((n_out,), jnp.float32)}


def init(key, spec: ContinuousARSpec) -> dict:
    """{"backbone": model params (tiny vocab), "in": token_dim -> hidden, "head": nets params}
    (+ "time": the context time embedding, xar only)."""
    kb, ki, kh, kt = jax.random.split(key, 4)
    head = gaussian_init(kh, spec) if spec.gaussian_head else nets.init(kh, spec.head)
    params = {"backbone": model.init(spec.model_cfg, kb), "in": _dense(ki, spec.token_dim, spec.backbone.hidden_size),
              "head": head}
    if spec.order == "xar":
        params["time"] = _dense(kt, spec.head_time_dim, spec.backbone.hidden_size)
    return params


# ---- argument checks ----

def check_tokens(spec: ContinuousARSpec, x_BLD, name: str = "x_BLD"):
    shape = tuple(jnp.shape(x_BLD))
    if len(shape) != 3 or shape[1:] != (spec.seq_len, spec.token_dim):
        raise ConfigError(f"{name} has shape {shape}; expected [batch, seq_len={spec.seq_len}, "
                          f"token_dim={spec.token_dim}] (fix the data or the spec's seq_len / token_dim)")


def check_labels(spec: ContinuousARSpec, label_B, batch: int):
    if label_B is None:
        return
    if spec.num_classes == 0:
        raise ConfigError("label_B was given but the model is unconditional (num_classes=0); drop label_B or "
                          "build the spec with num_classes")
    if tuple(jnp.shape(label_B)) != (batch,):
        raise ConfigError(f"label_B has shape {tuple(jnp.shape(label_B))}; expected [{batch}] (one class per row)")
    if not jnp.issubdtype(jnp.result_type(label_B), jnp.integer):
        raise ConfigError(f"label_B must hold integer class ids, got dtype {jnp.result_type(label_B)}")
    if not isinstance(label_B, jax.core.Tracer):
        labels = np.asarray(label_B)
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            bad = labels[(labels < 0) | (labels >= spec.num_classes)][0]
            raise ConfigError(f"label_B holds class {int(bad)} outside [0, num_classes={spec.num_classes}); "
                              "pass label_B=None for the null (unconditional) class")


def labels_or_null(spec: ContinuousARSpec, label_B, batch: int):
    """[B] int32 labels in [0, C]; None means the null class (unconditional)."""
    if label_B is None:
        return jnp.full((batch,), spec.null_label, jnp.int32)
    return jnp.asarray(label_B, jnp.int32)


def head_label(spec: ContinuousARSpec, label_N):
    return label_N if spec.num_classes else None


# ---- inputs and the backbone ----

def embed_tokens(params, x_BLD):
    """Tokens projected to the model width [B, L, E]."""
    return x_BLD @ params["in"]["w"] + params["in"]["b"]


def class_rows(params, label_B):
    """[B, E] the learned class vector of each row (null class = [BOS])."""
    return params["backbone"]["embed"][1 + label_B].astype(jnp.float32)


def context_time(params, spec: ContinuousARSpec, t_B):
    """xar: [B, E] embedding of a context entity's noise level t (1 = clean)."""
    return nets.time_features(t_B, spec.head_time_dim, 1000.0) @ params["time"]["w"] + params["time"]["b"]


def context_inputs(params, spec: ContinuousARSpec, x_BLD, t_BN=None):
    """The vectors a block-causal order feeds for its tokens as context: in(x), plus (xar) the
    embedding of each entity's noise level t_BN (default: clean, t=1)."""
    e_BLE = embed_tokens(params, x_BLD)
    if spec.order != "xar":
        return e_BLE
    B, L = x_BLD.shape[:2]
    n = L // spec.block_size  # whole entities (a sampler feeds one at a time)
    t_BN = jnp.ones((B, n), jnp.float32) if t_BN is None else t_BN
    temb_BNE = context_time(params, spec, t_BN.reshape(-1)).reshape(B, n, -1)
    return e_BLE + jnp.repeat(temb_BNE, spec.block_size, axis=1)


def block_inputs(params, spec: ContinuousARSpec, ctx_BLE, label_B):
    """Teacher-forcing inputs of the causal / xar orders: [class]*block, then the context shifted
    right by one block, so position i sees (through the layout) the tokens of earlier entities."""
    B, L, E = ctx_BLE.shape
    start = jnp.broadcast_to(class_rows(params, label_B)[:, None], (B, spec.block_size, E))
    return jnp.concatenate([start, ctx_BLE[:, :L - spec.block_size]], axis=1)


def mar_inputs(params, label_B, x_BLD, masked_BL):
    """MAR's inputs [B, 1 + L, E]: the class vector, then each token or the [MASK] vector."""
    mask_E = params["backbone"]["embed"][MASK_ROW].astype(jnp.float32)
    tok_BLE = jnp.where(masked_BL[..., None], mask_E, embed_tokens(params, x_BLD))
    return jnp.concatenate([class_rows(params, label_B)[:, None], tok_BLE], axis=1)


def hidden(params, spec: ContinuousARSpec, inputs_BLE, cache=None):
    """Backbone hidden states [B, L, E] (and the cache) over input vectors, in the spec's layout."""
    z, cache = model.forward(params["backbone"], spec.model_cfg, None, layout=spec.layout(), cache=cache,
                             inputs_BLE=inputs_BLE, return_hidden=True)
    return z.astype(jnp.float32), cache


def teacher_hidden(params, spec: ContinuousARSpec, ctx_BLD, label_B, t_BN=None):
    """Causal / xar: z_i [B, L, E] given the context tokens of earlier entities (clean, or noised
    by the caller to the per-entity levels t_BN)."""
    z, _ = hidden(params, spec, block_inputs(params, spec, context_inputs(params, spec, ctx_BLD, t_BN), label_B))
    return z


def mar_train_mask(spec: ContinuousARSpec, key, batch: int):
    """[B, L] MAR's training mask: the first ceil(L r) tokens of a random order per row, r from the
    truncated normal N(1, 0.25^2) on [mask_ratio_min, 1] (one r per row)."""
    k_order, k_rate = jax.random.split(key)
    L = spec.seq_len
    rank_BL = jnp.argsort(jax.random.permutation(k_order, jnp.tile(jnp.arange(L), (batch, 1)), axis=1,
                                                 independent=True), axis=1)
    lower = (spec.mask_ratio_min - 1.0) / 0.25
    rate_B = 1.0 + 0.25 * jax.random.truncated_normal(k_rate, lower, 0.0, (batch,))
    n_B = jnp.clip(jnp.ceil(L * rate_B), 1, L).astype(jnp.int32)
    return rank_BL < n_B[:, None]


# ---- the head ----

def gaussian_init(key, spec: ContinuousARSpec) -> dict:
    """The Gaussian head: an MLP z (+ label embedding) -> (mean, log-std), head_depth SiLU layers of
    head_hidden; the output layer starts at zero (N(0, I), as a fresh flow head's zero velocity)."""
    keys = jax.random.split(key, spec.head_depth + 1)
    sizes = [spec.backbone.hidden_size] + [spec.head_hidden] * spec.head_depth
    head = {"layers": [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])],
            "out": {"w": jnp.zeros((spec.head_hidden, 2 * spec.token_dim), jnp.float32),
                    "b": jnp.zeros((2 * spec.token_dim,), jnp.float32)}}
    if spec.num_classes:
        head["label"] = 0.02 * jax.random.normal(keys[-1], (spec.num_classes + 1, spec.backbone.hidden_size))
    return head


def gaussian_params(head, spec: ContinuousARSpec, z_NE, label_N):
    """(mean [N, D], log-std [N, D]) of the Gaussian head."""
    h = z_NE if not spec.num_classes else z_NE + head["label"][label_N]
    for layer in head["layers"]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    out = h @ head["out"]["w"] + head["out"]["b"]
    return out[:, :spec.token_dim], out[:, spec.token_dim:]


def gaussian_nll(x_ND, mean_ND, log_std_ND):
    """[N] exact NLL of a diagonal Gaussian, in nats."""
    u = (x_ND - mean_ND) * jnp.exp(-log_std_ND)
    return 0.5 * jnp.sum(u * u + LOG_2PI, axis=-1) + jnp.sum(log_std_ND, axis=-1)


def head_loss(head, spec: ContinuousARSpec, x_ND, z_NE, label_N, key):
    """[N] per-token head loss: the FM v-loss averaged over head_batch_mul (t, noise) draws, or the
    Gaussian head's NLL per dimension."""
    if spec.gaussian_head:
        return gaussian_nll(x_ND, *gaussian_params(head, spec, z_NE, label_N)) / spec.token_dim
    M = spec.head_batch_mul
    rep = lambda a: None if a is None else jnp.repeat(a, M, axis=0)
    x1 = rep(x_ND)
    k0, kt = jax.random.split(key)
    x0 = jax.random.normal(k0, x1.shape, x1.dtype)
    t = losses.t_sampler(spec.time_sampler)(kt, (x1.shape[0],)).astype(x1.dtype)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    pred = nets.apply(head, spec.head, x_t, t, head_label(spec, rep(label_N)), rep(z_NE))
    return losses.fm_loss(pred, x0, x1, t, reduction="none").reshape(-1, M).mean(-1)


def std_normal_logpdf(x_ND):
    return -0.5 * jnp.sum(x_ND * x_ND + LOG_2PI, axis=-1)


def head_nll(head, spec: ContinuousARSpec, x_ND, z_NE, label_N, *, method: str, steps: int,
             exact_divergence: bool, key=None):
    """[N] -log p(x | z) in nats: closed form (Gaussian head) or the head's ODE log-likelihood
    (data t=1 -> source N(0, I) t=0 over `steps` intervals of `method`)."""
    if spec.gaussian_head:
        return gaussian_nll(x_ND, *gaussian_params(head, spec, z_NE, label_N))
    lab = head_label(spec, label_N)
    v = lambda x, t: nets.apply(head, spec.head, x, t, lab, z_NE)
    grid = (1.0, 0.0) if method == "dopri5" else np.linspace(1.0, 0.0, steps + 1)
    _, logp = log_likelihood(v, x_ND, std_normal_logpdf, grid, method, exact_divergence=exact_divergence, key=key)
    return -logp


# ---- training loss ----

def token_losses(params, spec: ContinuousARSpec, x_BLD, key, label_B=None):
    """([B, L] per-token training loss, [B, L] weights: 1 where the loss counts). Pure and jit-able;
    the noise of token i depends on (key, shapes) only, never on other tokens' values."""
    check_tokens(spec, x_BLD)
    B, L, D = x_BLD.shape
    check_labels(spec, label_B, B)
    x_BLD = jnp.asarray(x_BLD, jnp.float32)
    k_drop, k_mask, k_ctx, k_head = jax.random.split(key, 4)
    label = labels_or_null(spec, label_B, B)
    if label_B is not None and spec.label_drop > 0:
        label = jnp.where(jax.random.bernoulli(k_drop, spec.label_drop, (B,)), spec.null_label, label)
    if spec.order == "mar":
        masked = mar_train_mask(spec, k_mask, B)
        z, _ = hidden(params, spec, mar_inputs(params, label, x_BLD, masked))
        z, weight = z[:, 1:], masked.astype(jnp.float32)
    else:
        ctx, t_BN = x_BLD, None
        if spec.order == "xar":  # noisy context: each entity at its own logit-normal t, its own noise
            kt, ke = jax.random.split(k_ctx)
            t_BN = losses.logit_normal_t(kt, (B, spec.num_entities))
            t_BL1 = jnp.repeat(t_BN, spec.block_size, axis=1)[..., None]
            ctx = t_BL1 * x_BLD + (1 - t_BL1) * jax.random.normal(ke, x_BLD.shape)
        z = teacher_hidden(params, spec, ctx, label, t_BN)
        weight = jnp.ones((B, L), jnp.float32)
    per = head_loss(params["head"], spec, x_BLD.reshape(B * L, D), z.reshape(B * L, -1), jnp.repeat(label, L), k_head)
    return per.reshape(B, L), weight


def loss(params, spec: ContinuousARSpec, x_BLD, key, label_B=None):
    """(scalar training loss, metrics {"loss", "loss_tokens": fraction of tokens with a loss})."""
    per, weight = token_losses(params, spec, x_BLD, key, label_B)
    value = jnp.sum(per * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return value, {"loss": value, "loss_tokens": jnp.mean(weight)}


# ---- exact per-token NLL ----

def token_nll(params, spec: ContinuousARSpec, x_BLD, *, method: str = "midpoint", steps: int = 32,
              exact_divergence: bool = True, key=None, label_B=None, order_BL=None):
    """[B, L] per-token NLL in nats: -log p(x_i | context) from the head's ODE log-likelihood
    (source N(0, I); closed form for the Gaussian head), summing to -log p(x) under the model.

    causal / xar: teacher forcing on the true previous tokens (clean context, t=1); one forward.
    mar: the chain rule along one generation order, one token revealed at a time: the token at
    step s of `order_BL` (a permutation per row; default raster 0..L-1) is scored with the tokens
    of steps < s known and the rest [MASK]. Exact for that order, at the price of L forwards (run
    as one forward of B*L rows). MAR's own sampler reveals several tokens per iteration, so this
    is the density of its one-token-per-step limit under that order, not of a random order.
    The ODE error (method, steps) is the only approximation; Hutchinson (exact_divergence=False)
    needs `key` and is unbiased for log p, not for the NLL's exponent."""
    check_tokens(spec, x_BLD)
    check_labels(spec, label_B, x_BLD.shape[0])
    solvers.check_method(method)
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive integer (ODE intervals of the head)")
    if not exact_divergence and key is None and not spec.gaussian_head:
        raise ConfigError("exact_divergence=False (Hutchinson) needs key=...")
    if order_BL is not None:
        if spec.order != "mar":
            raise ConfigError(f"order_BL applies to the mar order, not {spec.order!r}")
        if tuple(jnp.shape(order_BL)) != x_BLD.shape[:2]:
            raise ConfigError(f"order_BL has shape {tuple(jnp.shape(order_BL))}; expected {x_BLD.shape[:2]} "
                              "(a permutation of positions per row)")
    if spec.order == "mar" and order_BL is None:  # raster (an array either way: one compiled program)
        order_BL = np.broadcast_to(np.arange(spec.seq_len, dtype=np.int32), x_BLD.shape[:2])
    return _token_nll(params, spec, jnp.asarray(x_BLD, jnp.float32), key, label_B, order_BL, method=method,
                      steps=steps, exact_divergence=exact_divergence)


@functools.partial(jax.jit, static_argnames=("spec", "method", "steps", "exact_divergence"))
def _token_nll(params, spec, x_BLD, key, label_B, order_BL, *, method, steps, exact_divergence):
    B, L, D = x_BLD.shape
    label = labels_or_null(spec, label_B, B)
    if spec.order == "mar":
        z_BLE = _mar_chain_hidden(params, spec, x_BLD, label, order_BL)
    else:
        z_BLE = teacher_hidden(params, spec, x_BLD, label)
    nll = head_nll(params["head"], spec, x_BLD.reshape(B * L, D), z_BLE.reshape(B * L, -1), jnp.repeat(label, L),
                   method=method, steps=steps, exact_divergence=exact_divergence, key=key)
    return nll.reshape(B, L)


def _mar_chain_hidden(params, spec, x_BLD, label_B, order_BL):
    """[B, L, E]: z at each position p from the copy where exactly the tokens generated before p
    (in order_BL) are known."""
    B, L, _ = x_BLD.shape
    step_BL = jnp.argsort(jnp.asarray(order_BL, jnp.int32), axis=1)  # generation step of each position
    masked_BPL = step_BL[:, None, :] >= step_BL[:, :, None]  # copy p (scoring position p): later steps masked
    rep = lambda a: jnp.repeat(a, L, axis=0)
    inputs = mar_inputs(params, rep(label_B), rep(x_BLD), masked_BPL.reshape(B * L, L))
    z, _ = hidden(params, spec, inputs)
    z_BPLE = z[:, 1:].reshape(B, L, L, -1)
    return z_BPLE[:, jnp.arange(L), jnp.arange(L)]  # copy p, position p
