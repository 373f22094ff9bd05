"""Bound methods, written once over the rule interface, and their dispatch."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import backward, crown_intervals
from jaxlirpa.methods.forward import forward_linear
from jaxlirpa.methods.ibp import ibp_intervals
from jaxlirpa.rules.base import Interval, LinearBounds

METHODS = ("ibp", "crown", "crown-ibp", "forward")


def _spec_interval(b: Interval, C) -> Interval:
    lo, hi = b.lower.reshape(-1), b.upper.reshape(-1)
    if C is None:
        return Interval(lo, hi)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    return Interval(C @ mid - jnp.abs(C) @ rad, C @ mid + jnp.abs(C) @ rad)


def _spec_linear(lin: LinearBounds, C) -> LinearBounds:
    n = lin.lw.shape[0]
    lw, uw = lin.lw.reshape(n, -1), lin.uw.reshape(n, -1)
    lb, ub = lin.lb.reshape(-1), lin.ub.reshape(-1)
    if C is None:
        return LinearBounds(lw, lb, uw, ub)
    pos, neg = jnp.maximum(C, 0), jnp.minimum(C, 0)
    return LinearBounds(lw @ pos.T + uw @ neg.T, pos @ lb + neg @ ub, uw @ pos.T + lw @ neg.T, pos @ ub + neg @ lb)


def bound_flat(ctx: Context, method: str, C) -> Interval:
    """Bounds of ``C @ flat(output)`` (or of the flat output when C is None) for one example."""
    out = ctx.graph.outputs[0]
    if not ctx.graph.is_perturbed(out):
        v = ctx.value(out)
        return _spec_interval(Interval(v, v), C)
    if method == "ibp":
        return _spec_interval(ibp_intervals(ctx)[out], C)
    if method in ("crown", "crown-ibp"):
        bounds = crown_intervals(ctx, "ibp" if method == "crown-ibp" else "crown")
        shape = ctx.graph.avals[out].shape
        A = jnp.eye(int(np.prod(shape)), dtype=ctx.graph.avals[out].dtype) if C is None else C
        A = A.reshape(A.shape[0], *shape)
        lo, hi = backward(ctx, out, A, A, bounds)
        return Interval(lo, hi)
    if method == "forward":
        linear, _ = forward_linear(ctx)
        lin = _spec_linear(linear[out], C)
        rows = lin.lb.shape[0]
        return ctx.concretize_linear(LinearBounds(lin.lw.reshape(-1, rows), lin.lb, lin.uw.reshape(-1, rows), lin.ub))
    raise ValueError(f"unknown method {method!r}")

