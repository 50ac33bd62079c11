"""The backbone: a Llama-family decoder as pure functions over a params pytree.

params = {"embed": [V, E], "layers": {name: [N, ...]}, "final_norm": [E], "lm_head": [E, V]?}
Layers are stacked on a leading axis and run with `lax.scan`. The attention layout decides the
paradigm (causal AR, full diffusion, block-causal, dual-stream, prefix); the model knows nothing
else about paradigms.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import layouts as layouts_lib
from jaxgen.attention import attention
from jaxgen import cache as cache_lib
from jaxgen.errors import JaxgenError
from jaxgen.layers import apply_rope, rms_norm, rope_cos_sin, swiglu


def param_axes(cfg) -> dict:
    """Logical axis names for every parameter (same tree structure as `init`)."""
    layer = {
        "attn_norm": ("layers", "norm"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if cfg.qkv_bias:
        layer |= {"bq": ("layers", "heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
                  "bv": ("layers", "kv_heads", "head_dim")}
    if cfg.qk_norm:
        layer |= {"q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim")}
    axes = {"embed": ("vocab", "embed"), "layers": layer, "final_norm": ("norm",)}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg) -> dict:
    N, E, H, K, D, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.mlp_dim, cfg.vocab_size)
    sizes = {"layers": N, "embed": E, "heads": H, "kv_heads": K, "head_dim": D, "mlp": F, "vocab": V, "norm": E}
    return jax.tree.map(lambda axes: tuple(sizes[a] for a in axes), param_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def init(cfg, key) -> dict:
    """Random params: N(0, init_std) matrices (output projections scaled by 1/sqrt(2N)), unit norms,
    zero biases."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    dtype = jnp.dtype(cfg.param_dtype)
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = jax.tree_util.keystr(path[-1:]).strip("[]'\"")
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name in ("bq", "bk", "bv"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            std = cfg.init_std / (jnp.sqrt(2.0 * cfg.num_layers) if name in ("wo", "w_down") else 1.0)
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _qkv(lp, cfg, x_BLE, cos, sin):
    if "wqkv" in lp:  # decode form (see `decode_params`): one matmul, then split
        B, L, _ = x_BLE.shape
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = jnp.einsum("ble,ef->blf", x_BLE, lp["wqkv"])
        if cfg.qkv_bias:
            qkv = qkv + lp["bqkv"]
        q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=-1)
        q, k, v = q.reshape(B, L, H, D), k.reshape(B, L, K, D), v.reshape(B, L, K, D)
    else:
        q = jnp.einsum("ble,ehd->blhd", x_BLE, lp["wq"])
        k = jnp.einsum("ble,ehd->blhd", x_BLE, lp["wk"])
        v = jnp.einsum("ble,ehd->blhd", x_BLE, lp["wv"])
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], cfg.norm_eps), rms_norm(k, lp["k_norm"], cfg.norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _mlp(lp, x_BLE):
    if "w_gate_up" in lp:  # decode form: gate and up in one matmul
        gate, up = jnp.split(jnp.einsum("ble,ef->blf", x_BLE, lp["w_gate_up"]), 2, axis=-1)
        return jnp.einsum("blf,fe->ble", jax.nn.silu(gate) * up, lp["w_down"])
    return swiglu(x_BLE, lp["w_gate"], lp["w_up"], lp["w_down"])


def _remat(fn, cfg):
    if cfg.remat == "full":
        return jax.checkpoint(fn)
    if cfg.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
    return fn


def decode_params(params) -> dict:
    """The decode form of params: "layers" as a list of per-layer dicts, with the q/k/v
    projections fused into one "wqkv" [E, (H + 2K) * D] matrix (and "bqkv") and gate/up into
    "w_gate_up" [E, 2F]. Every sampler and `forward` accept either form.

    Convert once, outside the samplers (a copy of the weights: drop the stacked params after it
    if memory is tight), when decode speed matters: decode then runs unrolled over the layers,
    and per step reads each weight once. Stacked params decode through one `lax.scan` over the
    layers instead: one layer's weights as temporaries and compile time flat in the depth, but on
    XLA CPU each step copies every layer's slice (measured 1.4-4x slower per step on small models;
    accelerators fuse the slice into the matmul).
    """
    if is_decode_form(params):
        return params
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return dict(params, layers=[_fuse_layer(jax.tree.map(lambda a: a[i], params["layers"])) for i in range(n)])


unstack_layers = decode_params  # the earlier name


def is_decode_form(params) -> bool:
    """Whether `params` are in the decode form of `decode_params` (a list of layers)."""
    return isinstance(params["layers"], (list, tuple))


def _fuse_layer(lp: dict) -> dict:
    flat = lambda w: w.reshape(w.shape[0], -1)
    fused = {k: v for k, v in lp.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    fused["wqkv"] = jnp.concatenate([flat(lp["wq"]), flat(lp["wk"]), flat(lp["wv"])], axis=1)
    if "bq" in lp:
        fused["bqkv"] = jnp.concatenate([lp["bq"].ravel(), lp["bk"].ravel(), lp["bv"].ravel()])
    fused["w_gate_up"] = jnp.concatenate([lp["w_gate"], lp["w_up"]], axis=1)
    return fused


def _run_layers(body, carry, layers, per_layer=(), last_body=None):
    """Run `body(carry, xs) -> (carry, ys)` over the layers: `lax.scan` over stacked params, or a
    Python loop over a list of per-layer params (see `decode_params`). xs = layer params, or
    (layer params, *per_layer[i]); each of `per_layer` is stacked or a list to match. Returns
    (carry, ys) with ys stacked (scan) or a list (loop). In the loop, `last_body` (if given)
    replaces `body` for the last layer."""
    if isinstance(layers, (list, tuple)):
        ys = []
        for i, lp in enumerate(layers):
            fn = last_body if last_body is not None and i == len(layers) - 1 else body
            carry, y = fn(carry, (lp, *(a[i] for a in per_layer)) if per_layer else lp)
            ys.append(y)
        return carry, ys
    return jax.lax.scan(body, carry, (layers, *per_layer) if per_layer else layers)


def _select_rows(a_BL, out_rows):
    """Rows [start, start + length) of axis 1 (start a scalar or one per row)."""
    start, length = out_rows
    start = jnp.asarray(start, jnp.int32)
    if start.ndim == 0:
        return jax.lax.dynamic_slice_in_dim(a_BL, start, length, axis=1)
    return jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, length, axis=0))(a_BL, start)


def default_positions(cache, batch: int, length: int):
    """RoPE positions of a chunk: 0..L-1 (static numpy, so attention kernels that need static
    coordinates, e.g. splash, can serve training forwards), or each row's next slots with a cache."""
    steps = np.arange(length, dtype=np.int32)
    if cache is None:
        return np.broadcast_to(steps, (batch, length))
    cache_lib.dense.check_rows(cache, batch)
    start = jnp.broadcast_to(cache_lib.access(cache).start, (batch,))
    return start[:, None] + steps


def _layout_idx(layout, layout_idx_BL, positions_BL):
    """The chunk's layout coordinates: given, 0..L-1 (two-stream layouts), or the positions."""
    if layout_idx_BL is not None:
        return jnp.broadcast_to(jnp.asarray(layout_idx_BL, jnp.int32), positions_BL.shape)
    if layout.two_stream:
        return np.broadcast_to(np.arange(positions_BL.shape[1], dtype=np.int32), positions_BL.shape)
    return positions_BL


def forward(params, cfg, tokens_BL, positions=None, layout=None, cache=None, *, return_hidden: bool = False,
            kv_valid_BL=None, out_rows: tuple | None = None, layout_idx_BL=None, split_B=None, inputs_BLE=None):
    """Run the decoder. Returns (logits [B, L, V] float32 — or hidden states [B, L, E] — , cache).

    positions: RoPE positions [B, L] (default: 0..L-1, or each row's next slots with a cache).
    layout: a `jaxgen.layouts.Layout` (default causal).
    cache: None (the chunk attends over itself), a `KVCache` (the chunk's K/V are appended at
      each row's length), or a `jaxgen.cache.read(c)` / `write_at(c, start, keep_BL)` access;
      the cache decides what each layer attends over (`jaxgen.cache.plan`).
    kv_valid_BL: optional key padding mask for the chunk's own keys.
    out_rows: (start, length) -> outputs for rows [start, start + length) only (length static,
      start a scalar or one per row). Every row still serves as key/value; in the decode form
      (`decode_params`) the last layer's queries, MLP and the head run on those rows only.
    layout_idx_BL: the chunk's layout coordinates (default: `positions`, or 0..L-1 for the
      two-stream layouts). With a cache they must be the chunk's slots: a chunk fed out of
      position order (WeDLM's reordered window, TiDAR's step) passes its slots here.
    split_B: the per-row boundary a per-row layout reads (`layout.per_row`; scalar or [B]).
    inputs_BLE: input vectors fed instead of token embeddings (tokens_BL=None): continuous-token
      models (`jaxgen.flow.continuous_ar`) project their tokens into the backbone themselves.
    """
    layout = layouts_lib.causal() if layout is None else layout
    B, L = _input_shape(tokens_BL, inputs_BLE, cfg)
    if layout.two_stream and cache is not None:
        raise JaxgenError(f"the {layout.kind} layout is a training layout and takes no KV cache")
    positions = default_positions(cache, B, L) if positions is None else jnp.asarray(positions, jnp.int32)
    q_idx = _layout_idx(layout, layout_idx_BL, positions)
    kv = cache_lib.plan(cache, q_idx, kv_valid_BL, cfg.dtype)
    dtype = jnp.dtype(cfg.dtype)
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    seq_len = L if cache is None else None

    def layer(x, xs, rows_only=False, layer_idx=None):
        lp, k_buf, v_buf = xs if cache is not None else (xs, None, None)
        lp = cast(lp)
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = _qkv(lp, cfg, h, cos, sin)
        keys, values, k_buf, v_buf = kv.layer(k_buf, v_buf, k, v, layer_idx)
        q_rows = q_idx
        if rows_only:  # last layer: queries (and the residual stream) of the output rows only
            q, x, q_rows = _select_rows(q, out_rows), _select_rows(x, out_rows), _select_rows(q_idx, out_rows)
        attn = attention(q, keys, values, layout, q_idx_BL=q_rows, kv_idx_BS=kv.kv_idx_BS, kv_valid_BS=kv.kv_valid_BS,
                         split_B=split_B, seq_len=seq_len, impl=cfg.attention_impl)
        x = x + jnp.einsum("blhd,hde->ble", attn, lp["wo"])
        h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
        return x + _mlp(lp, h), (k_buf, v_buf)

    x = params["embed"].astype(dtype)[tokens_BL] if inputs_BLE is None else inputs_BLE.astype(dtype)
    if cache is not None and not isinstance(params["layers"], (list, tuple)):
        x, new_k, new_v = _scan_with_cache(layer, x, params["layers"], cache_lib.access(cache).cache)
        new_cache = cache_lib.written(cache, new_k, new_v, L)
    else:
        buffers = () if cache is None else (cache_lib.access(cache).cache.k, cache_lib.access(cache).cache.v)
        last = None if out_rows is None else functools.partial(layer, rows_only=True)
        body = layer if cache is not None else _remat(layer, cfg)
        x, kv_out = _run_layers(body, x, params["layers"], buffers, last_body=last)
        new_cache = None if cache is None else cache_lib.written(cache, *_collect(kv_out, cache), L)
    if out_rows is not None and not isinstance(params["layers"], (list, tuple)):
        x = _select_rows(x, out_rows)  # stacked layers ran every row
    x = rms_norm(x, params["final_norm"].astype(dtype), cfg.norm_eps)
    if return_hidden:
        return x, new_cache
    return logits_from_hidden(params, cfg, x), new_cache


def _input_shape(tokens_BL, inputs_BLE, cfg) -> tuple[int, int]:
    """(B, L) of the chunk: token ids, or input vectors of the model's width (one of the two)."""
    if (tokens_BL is None) == (inputs_BLE is None):
        raise JaxgenError("pass either tokens_BL or inputs_BLE (input vectors instead of token embeddings), "
                          "not both or neither")
    if inputs_BLE is None:
        return tokens_BL.shape
    if inputs_BLE.ndim != 3 or inputs_BLE.shape[-1] != cfg.hidden_size:
        raise JaxgenError(f"inputs_BLE has shape {tuple(inputs_BLE.shape)}; expected [B, L, {cfg.hidden_size}] "
                          "(the model's hidden_size)")
    return inputs_BLE.shape[:2]


def _scan_with_cache(layer, x, layers, cache):
    """Stacked params meet the cache: one `lax.scan` over layers (compile time flat in the depth)
    whose carry is the whole stacked cache, written in place at each layer's index. Only one
    layer's weights are live as temporaries, never a copy of the model (`decode_params` trades
    that for speed). A per-layer (list) cache is stacked for the scan and handed back as a list."""
    as_list = cache.unstacked
    k_all, v_all = (jnp.stack(cache.k), jnp.stack(cache.v)) if as_list else (cache.k, cache.v)

    def body(carry, xs):
        x, k_all, v_all = carry
        lp, i = xs
        x, (k_all, v_all) = layer(x, (lp, k_all, v_all), layer_idx=i)
        return (x, k_all, v_all), None

    n = jax.tree.leaves(layers)[0].shape[0]
    (x, k_all, v_all), _ = jax.lax.scan(body, (x, k_all, v_all), (layers, jnp.arange(n)))
    return (x, list(k_all), list(v_all)) if as_list else (x, k_all, v_all)


def _collect(kv_out, cache):
    """Per-layer (k, v) outputs in the cache's own form (list or stacked)."""
    if isinstance(kv_out, list):
        k_new, v_new = [k for k, _ in kv_out], [v for _, v in kv_out]
        if not cache_lib.access(cache).cache.unstacked:
            k_new, v_new = jnp.stack(k_new), jnp.stack(v_new)
        return k_new, v_new
    return kv_out


def logits_from_hidden(params, cfg, hidden_BLE):
    """Project hidden states to float32 vocabulary logits (tied or untied head)."""
    dtype = hidden_BLE.dtype
    if cfg.tie_embeddings:
        return jnp.einsum("ble,ve->blv", hidden_BLE, params["embed"].astype(dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("ble,ev->blv", hidden_BLE, params["lm_head"].astype(dtype),
                      preferred_element_type=jnp.float32)


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnums=1)
def _first_out_of_vocab(tokens, vocab_size):
    """(whether any id lies outside [0, vocab_size), the first such id) of a token array."""
    bad = ((tokens < 0) | (tokens >= vocab_size)).ravel()
    return bad.any(), tokens.ravel()[jnp.argmax(bad)]


def check_tokens(tokens, cfg, name: str = "tokens"):
    """Raise if a concrete token array holds ids outside [0, vocab) (no-op on tracers)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    import numpy as np
    if isinstance(tokens, jax.Array) and len(tokens.sharding.device_set) > 1:
        # sharded (over several hosts, maybe): checked where it lives, never copied to the host
        if tokens.ndim != 2:
            raise JaxgenError(f"{name} must be a [batch, length] array of token ids, got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise JaxgenError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
        any_bad, bad = _first_out_of_vocab(tokens, cfg.vocab_size)  # replicated scalars: every host reads them
        if bool(any_bad):
            raise JaxgenError(f"{name} holds token id {int(bad)} outside the vocabulary [0, {cfg.vocab_size}); "
                              "re-tokenize with this model's tokenizer")
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise JaxgenError(f"{name} must be a [batch, length] array of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise JaxgenError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)].ravel()[0]
        raise JaxgenError(f"{name} holds token id {int(bad)} outside the vocabulary [0, {cfg.vocab_size}); "
                          "re-tokenize with this model's tokenizer")
