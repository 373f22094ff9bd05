"""Forward-mode LiRPA: every variable as linear functions of the input,
``lw @ e + lb <= v <= uw @ e + ub``, pushed forward through the rules.
Intermediate intervals are those linear bounds concretised, met with IBP's."""
from __future__ import annotations

from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import meet
from jaxlirpa.methods.ibp import ibp_intervals
from jaxlirpa.rules.base import LinearBounds


def forward_linear(ctx: Context) -> tuple[dict[int, LinearBounds], dict]:
    """Linear bounds of every perturbed variable, and the intervals the rules used."""
    linear = ctx.input_linear()
    bounds = ctx.input_intervals()
    ibp = ibp_intervals(ctx)  # met with each concretised bound: never looser than IBP
    for eqn in ctx.perturbed_eqns:
        rule = ctx.rule(eqn)
        if rule.needs_bounds:
            for v in eqn.inputs:
                if ctx.graph.is_perturbed(v) and v not in bounds:
                    bounds[v] = meet(ctx.concretize_linear(linear[v]), ibp[v])
        linear[eqn.outputs[0]] = rule.forward(eqn, ctx.operands(eqn, bounds, linear))
    return linear, bounds
