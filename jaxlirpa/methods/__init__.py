"""Bound methods, written once over the rule interface, and their dispatch."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxlirpa.methods.alpha_crown import AlphaOptions, alpha_crown
from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import backward, concretize, crown_intervals, pull_back
from jaxlirpa.methods.forward import forward_linear
from jaxlirpa.methods.ibp import ibp_intervals
from jaxlirpa.rules.base import Interval

METHODS = ("ibp", "crown", "crown-ibp", "forward", "alpha-crown")


def _rowsum(t):
    return jnp.sum(t, axis=tuple(range(1, t.ndim)))


def _fused_spec(ctx: Context, out, A, bounds, linear=None) -> Interval:
    """Bounds of ``A @ out`` with ``A`` carried back through the linear layers at the
    end of the graph (the spec fused into the last layer, as auto_LiRPA does),
    then met with the intervals (IBP) or linear bounds (forward) found there."""
    stop = {e.outputs[0] for e in ctx.perturbed_eqns if ctx.rule(e).needs_bounds}
    pending, lbias, ubias = pull_back(ctx, out, A, A, bounds, stop)
    at_inputs = {}
    for v, (lA, uA) in pending.items():
        if v in ctx.regions:
            at_inputs[v] = (lA, uA)
            continue
        lpos, lneg = jnp.maximum(lA, 0), jnp.minimum(lA, 0)
        upos, uneg = jnp.maximum(uA, 0), jnp.minimum(uA, 0)
        if linear is None:
            lo, hi = bounds[v]
            lbias, ubias = lbias + _rowsum(lpos * lo + lneg * hi), ubias + _rowsum(upos * hi + uneg * lo)
            continue
        lw, lb, uw, ub = linear[v]
        n = lw.shape[0]
        w = lambda pos, neg, w1, w2: (pos.reshape(pos.shape[0], -1) @ w1.reshape(n, -1).T
                                      + neg.reshape(neg.shape[0], -1) @ w2.reshape(n, -1).T)
        lbias, ubias = lbias + _rowsum(lpos * lb + lneg * ub), ubias + _rowsum(upos * ub + uneg * lb)
        for i, (wl, wu) in ctx.split_rows_pair(w(lpos, lneg, lw, uw), w(upos, uneg, uw, lw)).items():
            old = at_inputs.get(i, (0.0, 0.0))
            at_inputs[i] = (old[0] + wl, old[1] + wu)
    return Interval(*concretize(ctx, at_inputs, lbias, ubias))


def bound_flat(ctx: Context, method: str, C, alpha: AlphaOptions | None = None, warm=None, first=None, sizes=None):
    """Bounds of ``C @ flat(output)`` (or of the flat output when C is None) for one
    example, and alpha-CROWN's optimised slopes (None for other methods).
    ``first`` and ``sizes``: alpha-CROWN's sparse intermediate bounds (``alpha_crown``).

    A graph with several outputs (``fn`` returned a pytree; no spec) gets the flat
    outputs one after another, sharing the intermediate bounds: one pass of the
    method, not one per output."""
    outs = ctx.graph.outputs
    if len(outs) > 1:
        if method == "alpha-crown":
            warm = warm or [None] * len(outs)
            found = [_bound_one(ctx, o, method, None, alpha, w, first, sizes) for o, w in zip(outs, warm)]
            return _join([b for b, _ in found]), [s for _, s in found]
        return _join(_one_shot(ctx, method, None, outs)), None
    return _bound_one(ctx, outs[0], method, C, alpha, warm, first, sizes)


def _join(parts: list[Interval]) -> Interval:
    """One flat interval; a side no part computed (alpha-CROWN's ``bound="upper"``) stays None."""
    cat = lambda side: None if side[0] is None else jnp.concatenate(side)  # noqa: E731
    return Interval(cat([b.lower for b in parts]), cat([b.upper for b in parts]))


def _bound_one(ctx: Context, out, method: str, C, alpha: AlphaOptions | None, warm, first=None, sizes=None):
    if not ctx.graph.is_perturbed(out):
        v = ctx.value(out).reshape(-1)
        return (Interval(v, v) if C is None else Interval(C @ v, C @ v)), None
    if method == "alpha-crown":
        shape, dtype = ctx.graph.avals[out].shape, ctx.graph.avals[out].dtype
        A = jnp.eye(int(np.prod(shape)), dtype=dtype) if C is None else C
        A, opts = A.reshape(A.shape[0], *shape), alpha or AlphaOptions()
        if opts.bound != "both":
            return alpha_crown(ctx, out, A, opts, warm, first, sizes)[:2]
        # Like auto_LiRPA, lower and upper bounds are optimised in separate runs:
        # jointly, the shared intermediate slopes would have to compromise.
        warm = warm or {"lower": None, "upper": None}
        lo, slopes_lo, _ = alpha_crown(ctx, out, A, dataclasses.replace(opts, bound="lower"), warm["lower"], first, sizes)
        hi, slopes_hi, _ = alpha_crown(ctx, out, A, dataclasses.replace(opts, bound="upper"), warm["upper"], first, sizes)
        return Interval(lo.lower, hi.upper), {"lower": slopes_lo, "upper": slopes_hi}
    return _one_shot(ctx, method, C, [out])[0], None


def _one_shot(ctx: Context, method: str, C, outs) -> list[Interval]:
    """Flat bounds of each of ``outs`` (of ``C @ out`` for a single one), by one pass."""
    flat = lambda b: Interval(b.lower.reshape(-1), b.upper.reshape(-1))  # noqa: E731
    constant = {o: flat(Interval(ctx.value(o), ctx.value(o))) for o in outs if not ctx.graph.is_perturbed(o)}
    live = [o for o in outs if o not in constant]
    if C is not None:
        (out,), shape = live, ctx.graph.avals[live[0]].shape
        A = C.reshape(C.shape[0], *shape)
        if method == "ibp":
            return [_fused_spec(ctx, out, A, ibp_intervals(ctx))]
        if method == "forward":
            linear, bounds = forward_linear(ctx)
            return [_fused_spec(ctx, out, A, bounds, linear)]
        bounds = crown_intervals(ctx) if method == "crown" else ibp_intervals(ctx)
        return [Interval(*backward(ctx, out, A, A, bounds))]
    if method == "ibp":
        found = ibp_intervals(ctx, tuple(live))
    elif method == "forward":
        linear = forward_linear(ctx)[0]
        found = {o: ctx.concretize_linear(linear[o]) for o in live}
    else:
        bounds = crown_intervals(ctx) if method == "crown" else ibp_intervals(ctx)
        found = {}
        for o in live:  # an output that is also an intermediate already has CROWN's bound (crown)
            if method == "crown" and o in bounds:
                found[o] = bounds[o]
                continue
            shape, dtype = ctx.graph.avals[o].shape, ctx.graph.avals[o].dtype
            A = jnp.eye(int(np.prod(shape)), dtype=dtype).reshape(-1, *shape)
            found[o] = Interval(*backward(ctx, o, A, A, bounds))
    return [constant[o] if o in constant else flat(found[o]) for o in outs]
