"""Classifier-free guidance of a conditional velocity field.

Convention (flow_matching's image example, `eval_loop.py`): with guidance scale w,

    v = (1 + w) v_cond - w v_uncond  =  v_cond + w (v_cond - v_uncond)

so w = 0 is the plain conditional field (no guidance). SiT / xAR / the spec's formula
v_u + s (v_c - v_u) use s = 1 + w. Guidance applies to every channel (SiT applies it to the first
three only; we do not).

Guidance interval [t_lo, t_hi] (inclusive, in our time: noise t=0, data t=1): outside it w is 0
and only the conditional field is evaluated (a `lax.cond`, so the unconditional pass is skipped
when t is a concrete-per-call scalar; under vmap over t both run and one is selected).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.errors import JaxgenError

tmap = jax.tree_util.tree_map


def combine(v_cond, v_uncond, scale):
    """(1 + scale) v_cond - scale v_uncond."""
    return v_cond + scale * (v_cond - v_uncond)


def guide(velocity_fn, cond, null_cond, scale, interval=(0.0, 1.0), *, batched: bool = True):
    """velocity(x, t) of the guided field for a conditional `velocity_fn(x, t, cond)`.

    `null_cond` is the "no condition" input (e.g. the null class id), shaped like `cond` or
    broadcastable to it. `t` may be a scalar (as `solve` passes it) or a [B] vector. `scale` (w)
    and `interval` may be traced. batched=True evaluates the
    conditional and unconditional fields in one call on a doubled batch (x and cond concatenated
    along axis 0); batched=False makes two calls."""
    lo, hi = interval
    if not (isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer)) and not lo <= hi:
        raise JaxgenError(f"guidance interval {interval} must have t_lo <= t_hi, e.g. (0.0, 1.0)")
    null_cond = tmap(lambda n, c: jnp.broadcast_to(jnp.asarray(n, jnp.result_type(c)), jnp.shape(c)), null_cond, cond)

    def both(x, t):
        if not batched:
            return velocity_fn(x, t, cond), velocity_fn(x, t, null_cond)
        cat = lambda a, b: jnp.concatenate([a, b], axis=0)
        t2 = t if jnp.ndim(t) == 0 else cat(t, t)
        v = velocity_fn(tmap(lambda a: cat(a, a), x), t2, tmap(cat, cond, null_cond))
        B = jax.tree_util.tree_leaves(x)[0].shape[0]
        return tmap(lambda a: a[:B], v), tmap(lambda a: a[B:], v)

    def guided(x, t):
        def on(_):
            vc, vu = both(x, t)
            return tmap(lambda c, u: combine(c, u, jnp.asarray(scale, c.dtype)), vc, vu)

        def off(_):
            return velocity_fn(x, t, cond)

        if jnp.ndim(t) == 0:
            return jax.lax.cond((t >= lo) & (t <= hi), on, off, None)
        active = ((t >= lo) & (t <= hi))
        w = jnp.where(active, scale, 0.0)
        vc, vu = both(x, t)
        return tmap(lambda c, u: combine(c, u, w.reshape(w.shape + (1,) * (c.ndim - w.ndim)).astype(c.dtype)), vc, vu)

    return guided
