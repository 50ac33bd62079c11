"""`host_call(fn, result_shapes, *args)`: call a stateful host (NumPy) function from inside jit,
as `jax.experimental.io_callback(..., ordered=False)` does, at a tenth of its fixed cost.

`io_callback` copies its arguments onto a jax CPU device (`device_put`) before calling the
function: measured on this project's 2-core CPU box, a trivial callback with two small int32
arguments inside a `lax.while_loop` costs 117-140 us per call, of which ~105 us is that copy.
The constraint back end needs one call per decode step, and an AR step of the `small` preset
is 1-2.5 ms on that box, so the copy alone would eat ~10%. `host_call` lowers the same XLA
host-callback custom call (jax's `emit_python_callback`) with the function called directly on
the NumPy arguments: ~10 us per call. It uses private jax APIs; where they are missing or
changed it falls back to `io_callback` (set `USE_IO_CALLBACK = True` to force that path).

Ordering: the host functions mutate session state, and each call's inputs depend on the
previous call's outputs (tokens chosen under the returned mask), so data flow orders them; the
primitive carries an unordered IO effect so it is never removed or duplicated. No vmap / grad.
"""
from __future__ import annotations

import numpy as np
from jax.experimental import io_callback

USE_IO_CALLBACK = False


def _direct_primitive():
    """The fast primitive, or None where jax's private callback API is not what we expect."""
    try:
        from jax._src import callback as jax_callback
        from jax._src import core as jax_core
        from jax._src import effects
        from jax._src.interpreters import mlir
        from jax.extend.core import Primitive
    except ImportError:
        return None
    if not hasattr(jax_callback, "emit_python_callback"):
        return None

    class HostStateEffect(jax_core.Effect):
        """Reads and writes host session state (unordered: data flow orders the calls)."""

    effect = HostStateEffect()
    for kind in (effects.lowerable_effects, effects.control_flow_allowed_effects):
        kind.add_type(HostStateEffect)
    prim = Primitive("jaxgen_host_call")
    prim.multiple_results = True

    def abstract_eval(*avals, fn, result_avals):
        del avals, fn
        return result_avals, {effect}

    def lowering(ctx, *args, fn, result_avals):
        del result_avals

        def call(*flat):
            return tuple(fn(*flat))

        out, _, _ = jax_callback.emit_python_callback(ctx, call, None, list(args), ctx.avals_in, ctx.avals_out,
                                                      has_side_effect=True, returns_token=False)
        return out

    prim.def_effectful_abstract_eval(abstract_eval)
    prim.def_impl(lambda *args, fn, result_avals: [np.asarray(x) for x in fn(*map(np.asarray, args))])
    mlir.register_lowering(prim, lowering, cacheable=False)
    return prim, jax_core


_PRIMITIVE = _direct_primitive()


def host_call(fn, result_shapes, *args):
    """fn(*numpy args) -> tuple of NumPy arrays matching `result_shapes` (a list of
    jax.ShapeDtypeStruct); returns the tuple as arrays of the traced computation."""
    if USE_IO_CALLBACK or _PRIMITIVE is None:
        return tuple(io_callback(lambda *a: tuple(fn(*a)), tuple(result_shapes), *args,
                                                  ordered=False))
    prim, jax_core = _PRIMITIVE
    avals = tuple(jax_core.ShapedArray(s.shape, s.dtype) for s in result_shapes)
    return tuple(prim.bind(*args, fn=fn, result_avals=avals))
