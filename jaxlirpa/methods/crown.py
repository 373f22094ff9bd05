"""CROWN: backward linear bound propagation (Zhang et al. 2018; Xu et al. 2020).

``backward`` pulls ``A @ v`` back from a variable ``v`` to the inputs through
every rule, then concretises it over the input sets. Intermediate bounds (the
inputs of nonlinear rules) come from CROWN itself, in topological order, or
from IBP (CROWN-IBP).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.methods.context import Context
from jaxlirpa.methods.ibp import ibp_intervals
from jaxlirpa.rules.base import Interval


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def backward(ctx: Context, target: int, lA, uA, bounds) -> tuple[jax.Array | None, jax.Array | None]:
    """Lower bounds of ``lA @ target`` and upper bounds of ``uA @ target`` (either may be None).

    ``lA``/``uA`` have shape ``(rows, *target.shape)``; results have shape (rows,).
    """
    pending = {target: (lA, uA)}
    lbias = ubias = 0.0
    for eqn in reversed(ctx.perturbed_eqns):
        out = eqn.outputs[0]
        if out not in pending:
            continue
        A_l, A_u = pending.pop(out)
        grads, lb, ub = ctx.rule(eqn).backward(eqn, ctx.operands(eqn, bounds), A_l, A_u)
        lbias, ubias = lbias + lb, ubias + ub
        for v, g in zip(eqn.inputs, grads):
            if g is not None:
                old = pending.get(v, (None, None))
                pending[v] = (_add(old[0], g[0]), _add(old[1], g[1]))
    lower = None if lA is None else ctx.concretize({i: pending[i][0] for i in ctx.regions if i in pending}, -1) + lbias
    upper = None if uA is None else ctx.concretize({i: pending[i][1] for i in ctx.regions if i in pending}, +1) + ubias
    return lower, upper


def identity_rows(aval) -> jax.Array:
    n = int(np.prod(aval.shape))
    return jnp.eye(n, dtype=aval.dtype).reshape(n, *aval.shape)


def interval_of(ctx: Context, v: int, bounds) -> Interval:
    """CROWN bounds of every element of ``v``."""
    aval = ctx.graph.avals[v]
    eye = identity_rows(aval)
    lo, hi = backward(ctx, v, eye, eye, bounds)
    return Interval(lo.reshape(aval.shape), hi.reshape(aval.shape))


def crown_intervals(ctx: Context, interm: str = "crown") -> dict[int, Interval]:
    """Bounds on the inputs of every nonlinear rule (``interm``: 'crown' or 'ibp')."""
    if interm == "ibp":
        return ibp_intervals(ctx)
    bounds = ctx.input_intervals()
    for eqn in ctx.perturbed_eqns:
        if ctx.rule(eqn).needs_bounds:
            for v in eqn.inputs:
                if ctx.graph.is_perturbed(v) and v not in bounds:
                    bounds[v] = interval_of(ctx, v, bounds)
    return bounds
