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

import jax.numpy as jnp

from jaxlirpa.methods.context import Context
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
