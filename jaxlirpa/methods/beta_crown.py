"""beta-CROWN (Wang et al., NeurIPS 2021): CROWN on a sub-domain where chosen neurons of
piecewise-linear activations (ReLU and kin) are fixed to one side of their kink.

A split is a sign per input element of a splittable rule: ``+1`` means ``z >= k``, ``-1``
means ``z <= k`` (``k`` the kink, 0 for ReLU), ``0`` no split. It acts twice:
- the neuron's bounds are cut at the kink, so its relaxation becomes exact;
- the constraint ``s (z - k) >= 0`` enters the bound with a multiplier ``beta >= 0``
  (Lagrangian duality): on the sub-domain ``f >= f - beta s (z - k)``, and the right
  side is bounded by CROWN over the whole domain, so every ``beta >= 0`` gives a sound
  lower bound and optimising beta (with alpha) tightens it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlirpa.methods.alpha_crown import Slopes
from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import concretize, pull_back
from jaxlirpa.rules.base import Interval


def splittable(ctx: Context) -> dict[int, object]:
    """The perturbed input variable of every splittable rule, mapped to its equation."""
    found = {}
    for eqn in ctx.perturbed_eqns:
        if getattr(ctx.rule(eqn), "splittable", False):
            (v,) = [v for v in eqn.inputs if ctx.graph.is_perturbed(v)]
            found[v] = eqn
    return found


def kinks(ctx: Context, bounds) -> dict[int, jnp.ndarray]:
    """Where each splittable variable is cut (shaped like it)."""
    return {v: ctx.rule(e).breakpoint(e, ctx.operands(e, bounds)) for v, e in splittable(ctx).items()}


def apply_splits(bounds: dict, splits: dict, kink: dict) -> dict:
    """``bounds`` with every split neuron's interval cut at its kink."""
    cut = dict(bounds)
    for v, s in splits.items():
        lo, hi = bounds[v]
        cut[v] = Interval(jnp.where(s > 0, jnp.maximum(lo, kink[v]), lo), jnp.where(s < 0, jnp.minimum(hi, kink[v]), hi))
    return cut


def beta_terms(splits: dict, betas: dict, kink: dict):
    """The Lagrangian terms of the split constraints for a lower bound: ``seeds`` for
    :func:`pull_back` (``-beta s`` on each split variable) and the constant per row."""
    seeds, bias = {}, 0.0
    for v, s in splits.items():
        coef = betas[v] * s  # (rows, *shape); zero where s == 0
        seeds[v] = (-coef, None)
        bias = bias + jnp.sum((coef * kink[v]).reshape(coef.shape[0], -1), axis=1)
    return seeds, bias


def optimised_lower(ctx: Context, out: int, A, bounds, *, iterations: int, alphas=None, splits=None,
                    betas=None, learning_rate: float = 0.1):
    """Lower bounds of ``A @ out`` with the intermediate ``bounds`` held fixed, the output's
    slopes (alpha; CROWN's own when ``alphas`` is None) and the split multipliers (beta)
    tuned by ``iterations`` Adam steps, keeping the best bound of every row.

    Cheap next to recomputing intermediate bounds (one backward pass of ``A``'s rows per
    step), which is why branch and bound tunes these only. Returns ``(rows, (alphas,
    betas), (input coefficients of the last step's lower bound, that bound's rows),
    {variable: coefficients reaching it})``: with steps the best rows may come from an
    earlier step, whose linear bound is not the last one.
    """
    splits = splits or {}
    x = ctx.graph.perturbed_inputs[0]
    kink = kinks(ctx, bounds) if splits else {}
    bounds = apply_splits(bounds, splits, kink)
    recorder = Slopes()
    ctx.slopes = recorder
    pull_back(ctx, out, A, None, bounds)  # CROWN's slopes and their valid ranges
    ranges = recorder.ranges
    params = (recorder.init if alphas is None else alphas, betas if betas is not None else {})

    def evaluate(params):
        ctx.slopes = Slopes(params[0])
        seeds, bias = beta_terms(splits, params[1], kink)
        seen = {}
        pending, lbias, _ = pull_back(ctx, out, A, None, bounds, seeds=seeds, seen=seen)
        rows, _ = concretize(ctx, pending, lbias + bias, 0.0, upper=False)
        return rows, (pending[x][0], seen)

    optimizer = optax.adam(optax.exponential_decay(learning_rate, 1, 0.98))

    def step(carry, _):
        params, state, best = carry
        (_, (rows, _)), grads = jax.value_and_grad(
            lambda p: (lambda r: (-jnp.sum(r[0]), r))(evaluate(p)), has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        params = ({k: jnp.clip(a, *ranges[k]) for k, a in params[0].items()},
                  {v: jnp.maximum(b, 0.0) for v, b in params[1].items()})
        return (params, state, jnp.maximum(best, rows)), None

    if iterations:
        rows0, _ = evaluate(params)
        (params, _, best), _ = jax.lax.scan(step, (params, optimizer.init(params), rows0), None, length=iterations)
    rows, (input_A, seen) = evaluate(params)
    ctx.slopes = None
    return (jnp.maximum(rows, best) if iterations else rows), params, (input_A, rows), seen
