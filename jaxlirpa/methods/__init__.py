"""Bound methods, written once over the rule interface, and their dispatch."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.methods.alpha_crown import AlphaOptions, alpha_crown, use_columns
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
    ``first`` and ``sizes``: alpha-CROWN's sparse intermediate bounds (``alpha_crown``),
    or, for CROWN, the bounds of its earlier stages and its column sizes (``staged``).

    A graph with several outputs (``fn`` returned a pytree; no spec) gets the flat
    outputs one after another, sharing the intermediate bounds: one pass of the
    method, not one per output."""
    outs = ctx.graph.outputs
    if len(outs) > 1:
        if method == "alpha-crown":
            warm = warm or [None] * len(outs)
            found = [_bound_one(ctx, o, method, None, alpha, w, first, sizes) for o, w in zip(outs, warm)]
            return _join([b for b, _ in found]), [s for _, s in found]
        return _join(_one_shot(ctx, method, None, outs, first, sizes)), None
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
        return _both_sides(ctx, out, A, opts, warm, first, sizes)
    return _one_shot(ctx, method, C, [out], first, sizes)[0], None


def _both_sides(ctx: Context, out, A, opts: AlphaOptions, warm, first, sizes):
    """alpha-CROWN's lower and upper bounds of ``A @ out``, optimised in separate runs like
    auto_LiRPA's (jointly, the shared intermediate slopes would have to compromise). The
    upper bound is minus the lower bound of ``-A @ out`` (the same relaxations meet the same
    signs), so both are one lower run mapped over ``(A, -A)``: one loop body to compile, not
    two, and one run's memory at a time. ``Bounds.alphas["upper"]`` are that run's slopes."""
    warm = warm or {"lower": None, "upper": None}
    if (warm["lower"] is None) != (warm["upper"] is None):
        raise ValueError("alpha_init needs the slopes of both runs, {'lower': ..., 'upper': ...}, "
                         "as an earlier result's .alphas holds them (or bound='lower'/'upper' for one).")
    sides = (jnp.stack([A, -A]), None if warm["lower"] is None
             else jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), warm["lower"], warm["upper"]))
    lower_run = dataclasses.replace(opts, bound="lower")

    def run(side):
        found, slopes, _ = alpha_crown(ctx, out, side[0], lower_run, side[1], first, sizes)
        return found.lower, slopes

    lower, slopes = jax.lax.map(run, sides)
    side = lambda k: jax.tree_util.tree_map(lambda s: s[k], slopes)  # noqa: E731
    return Interval(lower[0], -lower[1]), {"lower": side(0), "upper": side(1)}


def _crown_bounds(ctx: Context, known, sizes) -> dict[int, Interval]:
    """CROWN's intermediate bounds, those of its earlier stages (``known``) taken as they are,
    its pulls through the column candidates sized in ``sizes`` keeping that many columns."""
    if known is None:
        return crown_intervals(ctx)
    use_columns(ctx, known, sizes)
    return crown_intervals(ctx, known=known)


def _one_shot(ctx: Context, method: str, C, outs, known=None, sizes=None) -> list[Interval]:
    """Flat bounds of each of ``outs`` (of ``C @ out`` for a single one), by one pass
    (CROWN's stages before it: ``known`` and ``sizes``, see :func:`_crown_bounds`)."""
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
        bounds = _crown_bounds(ctx, known, sizes) if method == "crown" else ibp_intervals(ctx)
        return [Interval(*backward(ctx, out, A, A, bounds))]
    if method == "ibp":
        found = ibp_intervals(ctx, tuple(live))
    elif method == "forward":
        linear = forward_linear(ctx)[0]
        found = {o: ctx.concretize_linear(linear[o]) for o in live}
    else:
        bounds = _crown_bounds(ctx, known, sizes) if method == "crown" else ibp_intervals(ctx)
        found = {}
        for o in live:  # an output that is also an intermediate already has CROWN's bound (crown)
            if method == "crown" and o in bounds:
                found[o] = bounds[o]
                continue
            shape, dtype = ctx.graph.avals[o].shape, ctx.graph.avals[o].dtype
            A = jnp.eye(int(np.prod(shape)), dtype=dtype).reshape(-1, *shape)
            found[o] = Interval(*backward(ctx, o, A, A, bounds))
    return [constant[o] if o in constant else flat(found[o]) for o in outs]
