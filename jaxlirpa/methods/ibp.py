"""Interval bound propagation: elementwise intervals, forward through the graph.

Where an input set is not a box (L2, L1 balls), the affine part of the graph
right after the input is bounded exactly through the set's dual norm, as
auto_LiRPA does, instead of through the set's bounding box.
"""
from __future__ import annotations

import numpy as np

from jaxlirpa._compat import lax_primitives as P, stack_p
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


# Each output element is (a multiple of) one input element, plus a constant.
_MONOMIAL = {P.add_p, P.sub_p, P.neg_p, P.mul_p, P.div_p, P.broadcast_in_dim_p, P.reshape_p, P.transpose_p,
             P.squeeze_p, P.slice_p, P.pad_p, P.convert_element_type_p, P.rev_p, P.copy_p, P.stop_gradient_p,
             P.select_n_p, P.concatenate_p, P.dynamic_slice_p, P.gather_p} | ({stack_p} if stack_p else set())
# Each output element is a linear combination of several elements.
_MIXING = {P.dot_general_p, P.conv_general_dilated_p, P.reduce_sum_p, P.reduce_window_sum_p, P.cumsum_p}


def ibp_exact(ctx: Context) -> set[int]:
    """Variables whose IBP interval is exact: one mixing linear layer at most
    between them and box-shaped inputs (no dependency for IBP to lose)."""
    if any(r.p != np.inf for r in ctx.regions.values()):
        return set()
    monomial, exact = set(ctx.regions), set()
    for eqn in ctx.perturbed_eqns:
        ins = [v for v in eqn.inputs if ctx.graph.is_perturbed(v)]
        out = eqn.outputs[0]
        if eqn.prim in _MONOMIAL and (len(ins) == 1 or eqn.prim in (P.concatenate_p, stack_p)):
            if all(v in monomial for v in ins):
                monomial.add(out)
            elif all(v in monomial or v in exact for v in ins):
                exact.add(out)
        elif eqn.prim in _MIXING and all(v in monomial for v in ins):
            exact.add(out)
    return exact | monomial


def ibp_intervals(ctx: Context, outputs=()) -> dict[int, Interval]:
    """The IBP interval of every perturbed variable; those that feed a nonlinear
    rule, and ``outputs``, are bounded exactly when affine in a non-box input."""
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
    for v in outputs:
        if v in exact:
            bounds[v] = interval_of(ctx, v, bounds)
    return bounds
