"""Interval bound propagation: elementwise intervals, forward through the graph."""
from __future__ import annotations

from jaxlirpa.methods.context import Context
from jaxlirpa.rules.base import Interval


def ibp_intervals(ctx: Context) -> dict[int, Interval]:
    """The IBP interval of every perturbed variable."""
    bounds = ctx.input_intervals()
    for eqn in ctx.perturbed_eqns:
        bounds[eqn.outputs[0]] = ctx.rule(eqn).interval(eqn, ctx.operands(eqn, bounds))
    return bounds
