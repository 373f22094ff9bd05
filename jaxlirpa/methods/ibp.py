"""Interval bound propagation: elementwise intervals, forward through the graph.

Where an input set is not a box (L2, L1 balls), the affine part of the graph
right after the input is bounded exactly through the set's dual norm, as
auto_LiRPA does, instead of through the set's bounding box.
"""
from __future__ import annotations

import numpy as np

from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import interval_of
from jaxlirpa.rules.base import Interval


def affine_prefix(ctx: Context) -> set[int]:
    """Variables that are affine functions of the inputs (no nonlinear rule upstream)."""
    prefix = set(ctx.regions)
    for eqn in ctx.perturbed_eqns:
        if not ctx.rule(eqn).needs_bounds and all(v in prefix for v in eqn.inputs if ctx.graph.is_perturbed(v)):
            prefix.update(eqn.outputs)
    return prefix


def ibp_intervals(ctx: Context) -> dict[int, Interval]:
    """The IBP interval of every perturbed variable."""
    bounds = ctx.input_intervals()
    exact = set()
    if any(r.p != np.inf for r in ctx.regions.values()):
        exact = affine_prefix(ctx) - set(ctx.regions)
    for eqn in ctx.perturbed_eqns:
        rule = ctx.rule(eqn)
        if rule.needs_bounds:
            for v in eqn.inputs:
                if isinstance(v, int) and v in exact:
                    bounds[v] = interval_of(ctx, v, bounds)
                    exact.discard(v)
        out = eqn.outputs[0]
        if out not in bounds:
            bounds[out] = rule.interval(eqn, ctx.operands(eqn, bounds))
    return bounds
