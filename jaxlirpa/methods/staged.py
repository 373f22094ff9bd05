"""CROWN in stages, for concrete inputs (``jaxlirpa.bound`` called outside ``jax.jit``).

Rows pulled back through a ReLU are zero in the columns of its inactive neurons and the
same on both sides in those of its active ones, so the next dense layer has to multiply
only the others (``crown.SharedColumns``; on the MLP benchmark this halves the products).
How many there are is known only once the ReLU's input is bounded, and XLA's shapes are
static. So CROWN runs as a few programs: each bounds the intermediate variables up to the
next CROWN pass that would cross a ReLU whose counts are not known yet, and returns those
counts; the host reads them to size the next program, one read per such ReLU. The last
program is CROWN with every such ReLU sized (``bound_flat``'s ``first`` and ``sizes``).
The bounds are dense CROWN's: the columns dropped are zero. With traced inputs (under an
outer ``jax.jit``) nothing can be read, and CROWN runs as one dense program.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlirpa.methods.alpha_crown import column_candidates, column_counts, use_columns
from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import crown_intervals
from jaxlirpa.methods.ibp import ibp_exact
from jaxlirpa.rules.base import Interval


def _sources(ctx: Context, eqn) -> list[int]:
    return [v for v in eqn.inputs if ctx.graph.is_perturbed(v)]


def staged_candidates(ctx: Context) -> list:
    """Column candidates that a later intermediate CROWN pass crosses (with as many rows as
    the variable it bounds has elements); those only the output's pass crosses (a spec's
    few rows) are not worth a stage."""
    exact, producer = ibp_exact(ctx), ctx.graph.producer()

    def takes_a_pass(eqn) -> bool:
        return ctx.rule(eqn).needs_bounds and any(
            v not in exact and not getattr(ctx.rule(producer[v]), "elementwise", False)
            for v in _sources(ctx, eqn) if v in producer)

    last = max((ctx.position[e] for e in ctx.perturbed_eqns if takes_a_pass(e)), default=-1)
    return [e for e in column_candidates(ctx) if ctx.position[e] < last]


def stage(ctx: Context, known: dict[int, Interval], sizes: dict[tuple, int]):
    """One example's next stage: ``(bounds, counts, later)``, the intermediate bounds after
    ``known`` up to the next CROWN pass that crosses a staged candidate not sized in
    ``sizes``, the counts (``alpha_crown.column_counts``) of the candidates thereby
    bounded, and how many candidates are left for later stages (an array: the host reads it
    with the counts). With no candidate to size, nothing is bounded."""
    sized = {at for (kind, at, _) in sizes if kind == "columns"}
    waiting = [e for e in staged_candidates(ctx) if ctx.position[e] not in sized]
    if not waiting:
        return {}, {}, jnp.asarray(0)
    use_columns(ctx, known, sizes)
    bounds = crown_intervals(ctx, known=known, pause={v for e in waiting for v in _sources(ctx, e)})
    reached = [e for e in waiting if all(v in bounds for v in _sources(ctx, e))]
    counts = {key: n for eqn in reached for key, n in column_counts(ctx, bounds, eqn).items()}
    fresh = {v: b for v, b in bounds.items() if v not in ctx.regions and v not in known}
    return fresh, counts, jnp.asarray(len(waiting) - len(reached))


def is_concrete(*args) -> bool:
    """Whether no leaf of ``args`` is traced (there are counts to read)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args))
