"""The compiled calls of branch and bound, each over a batch of domains.

Networks of one architecture (the 45 ACAS Xu networks, say) trace to graphs of one
signature with different constants, so the compiled calls are cached by signature and
take the constants, the spec and the domains as arguments: one compilation serves all.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.attacks import pgd
from jaxlirpa.bab.problem import Problem, margin_of_rows
from jaxlirpa.graph import Graph
from jaxlirpa.methods.context import Context, compile_bounds
from jaxlirpa.methods.beta_crown import optimised_lower, splittable
from jaxlirpa.methods.crown import backward, crown_intervals, interval_of, meet, needed_intervals
from jaxlirpa.methods.ibp import ibp_intervals
from jaxlirpa.rules.base import Interval
from jaxlirpa.sets import Region

_COMPILED: dict[tuple, Callable] = {}


def cached(graph: Graph, build: Callable[[Graph], Callable], **jit_options) -> Callable:
    """``build(graph)``, compiled once per graph signature."""
    key = (graph.signature, build.__name__)
    if key not in _COMPILED:
        _COMPILED[key] = compile_bounds(build(graph), **jit_options)
    return _COMPILED[key]


def box_context(graph: Graph, consts, lo, hi) -> Context:
    """The bound context of one example whose input ranges over the box ``[lo, hi]``."""
    region = Region(center=(lo + hi) / 2, eps=(hi - lo) / 2, lo=lo, hi=hi, p=np.inf)
    return Context(graph, consts, [region.center], {graph.perturbed_inputs[0]: region})


def margins_fn(graph: Graph):
    def margins(consts, C, d, x):
        y = jax.vmap(lambda xi: graph.evaluate(consts, [xi])[0])(x)
        return margin_of_rows(jnp.einsum("kro,bo->bkr", C, y.reshape(len(x), -1)).reshape(len(x), -1), d)
    return margins


def _attack(graph: Graph):
    margins = margins_fn(graph)

    def attack(consts, C, d, lo, hi, key, restarts: int):
        x = pgd(lambda z: -margins(consts, C, d, z), (lo + hi) / 2, (hi - lo) / 2, steps=20,
                restarts=restarts, lower=lo, upper=hi, key=key)
        return x, margins(consts, C, d, x)
    return attack


def _instability(ctx: Context, eqn, v, interval: Interval) -> jax.Array:
    """How far each element of ``v`` (the input of the splittable ``eqn``) reaches past
    the kink on its nearer side, flat: positive exactly where it is unstable."""
    kink = ctx.rule(eqn).breakpoint(eqn, ctx.operands(eqn, {v: interval}))
    kink = jnp.broadcast_to(kink, interval.lower.shape).reshape(-1)
    return jnp.minimum(kink - interval.lower.reshape(-1), interval.upper.reshape(-1) - kink)


def most_unstable(ctx: Context, bounds) -> jax.Array:
    """The largest number of unstable neurons in any splittable layer."""
    counts = [jnp.sum(_instability(ctx, e, v, bounds[v]) > 0) for v, e in splittable(ctx).items()]
    return jnp.max(jnp.stack(counts)) if counts else jnp.zeros((), jnp.int32)


def sub_box_intervals(ctx: Context, reference: dict, rows: int | None) -> dict:
    """Intermediate bounds of a sub-box, starting from those of a box containing it
    (``reference``: sound here too) met with the sub-box's IBP bounds (exact at the
    first linear layer): CROWN recomputes only the ``rows`` most unstable neurons of
    each splittable layer (only those change a ReLU's relaxation; the rest keep the
    reference; None: all) and every element of other layers. O(rows) instead of O(width) backward
    rows per layer; where the reference has at most ``rows`` unstable neurons per
    layer, as tight as CROWN met with every ancestor's bounds."""
    consumer, own = splittable(ctx), ibp_intervals(ctx)

    def compute(v, bounds):
        ref = meet(own[v], reference[v])
        size = ref.lower.size
        if v not in consumer or rows is None or size <= rows:
            return meet(interval_of(ctx, v, bounds), ref)
        reach = _instability(ctx, consumer[v], v, ref)
        _, picked = jax.lax.top_k(jnp.where(reach > 0, reach, -jnp.inf), rows)
        A = jax.nn.one_hot(picked, size, dtype=ref.lower.dtype).reshape(rows, *ref.lower.shape)
        new_lo, new_hi = backward(ctx, v, A, A, bounds)
        lo, hi = ref.lower.reshape(-1), ref.upper.reshape(-1)
        return Interval(lo.at[picked].max(new_lo).reshape(ref.lower.shape),
                        hi.at[picked].min(new_hi).reshape(ref.lower.shape))

    return needed_intervals(ctx, ctx.input_intervals(), compute)


BOX_ALPHA_LR = 0.3
"""Adam's learning rate for a box's output slopes: on the open boxes of a hard ACAS Xu
search, 5 steps at 0.3 prove 67 % where 0.1 proves 26 % (no steps: 4 %)."""

SCORE_FLOOR = 0.1
"""Each input's coefficient counts as at least this fraction of the largest in the
split score: an input whose coefficient in the bound's line is near zero can still
loosen the intermediate bounds through its width, and would otherwise never be halved.
On ACAS Xu 1_1/prop_5 the search without it halves four inputs to float resolution
and times out; with it, 3,000 boxes (0.3 times out on 1_9/prop_7, 0.1 does not)."""

COMBINATION_STEPS = 20
"""Mirror-ascent steps of :func:`combined_rows` per conjunction."""


def combined_rows(a, value, best_rows, lo, hi, valid, steps: int = COMBINATION_STEPS):
    """The best lower bound over the box of one conjunction's rows: of a convex
    combination of them, or of a single row (``best_rows``, bounds that may come from
    other lines than ``a``); and the input coefficients of the combination found.

    Row ``r`` is at least ``a[r] @ x + b[r]`` on the box, and ``value[r]`` is that
    line's minimum. A counterexample makes every row ``<= 0``, so if some
    ``lam >= 0`` (summing to 1) has ``min_box sum_r lam[r] (a[r] @ x + b[r]) > 0``, the
    box has none (the LP dual of the conjunction): stronger than the best single row
    (a vertex of the simplex, the start) where different rows hold in different parts
    of the box. Tuned by mirror ascent; every ``lam`` gives a sound bound.
    """
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    low_end = lambda c: jnp.sum(jnp.minimum(c * lo, c * hi), axis=-1)
    b = jnp.where(valid, value - low_end(a), 0.0)
    a = jnp.where(valid[:, None], a, 0.0)

    def at(lam):
        c = lam @ a
        x = jnp.where(c > 0, lo, hi)  # the minimising corner: the supergradient is the rows there
        return lam @ b + low_end(c), a @ x + b

    start = jax.nn.one_hot(jnp.argmax(jnp.where(valid, value, -jnp.inf)), len(value), dtype=a.dtype)
    best0, _ = at(start)
    single = jnp.max(jnp.where(valid, best_rows, -jnp.inf))

    def step(carry, k):
        lam, best, best_lam = carry
        g, grad = at(lam)
        better = g > best
        best, best_lam = jnp.where(better, g, best), jnp.where(better, lam, best_lam)
        scale = jnp.max(jnp.where(valid, jnp.abs(grad - g), 0.0)) + 1e-12
        lam = jnp.where(valid, lam * jnp.exp(jnp.where(valid, grad - g, 0.0) / scale / jnp.sqrt(k + 1.0)), 0.0)
        return (lam / jnp.sum(lam), best, best_lam), None

    uniform = jnp.where(valid, 1.0, 0.0) / jnp.maximum(jnp.sum(valid), 1)
    lam0 = 0.5 * start + 0.5 * uniform
    (_, best, lam), _ = jax.lax.scan(step, (lam0, best0, start), jnp.arange(steps, dtype=a.dtype))
    return jnp.maximum(best, single), lam @ a


def _box_bounds(graph: Graph):
    margins = margins_fn(graph)
    out = graph.outputs[0]

    def one_box(consts, A, d, lo, hi, reference, iterations, rows):
        ctx = box_context(graph, consts, lo, hi)
        bounds = crown_intervals(ctx) if reference is None else sub_box_intervals(ctx, reference, rows)
        kept = {v: b for v, b in bounds.items() if v not in ctx.regions}
        bound_rows, _, (input_A, line_rows), _ = optimised_lower(ctx, out, A, bounds, iterations=iterations,
                                                                 learning_rate=BOX_ALPHA_LR)
        per_row, line_min = bound_rows.reshape(d.shape) - d, line_rows.reshape(d.shape) - d
        per_disjunct, coefficients = jax.vmap(combined_rows, in_axes=(0, 0, 0, None, None, 0))(
            input_A.reshape(*d.shape, -1), line_min, per_row, lo, hi, jnp.isfinite(d))
        # The worst disjunct's combined input coefficients (floored: SCORE_FLOOR) times
        # the widths: how much halving each input could move the bound (alpha-beta-CROWN's
        # "smart" input branching); the corner minimising that line is a likely counterexample.
        worst = jnp.argmin(per_disjunct)
        decisive = coefficients[worst]
        corner = jnp.where(decisive.reshape(lo.shape) > 0, lo, hi)
        magnitude = jnp.abs(decisive)
        magnitude = jnp.maximum(magnitude, SCORE_FLOOR * jnp.max(magnitude))
        return (jnp.min(per_disjunct), magnitude * (hi - lo).reshape(-1), corner,
                kept, most_unstable(ctx, bounds))

    def box_bounds(consts, A, C, d, lo, hi, reference, iterations: int, rows: int | None):
        bound, score, corner, kept, unstable = jax.vmap(
            lambda l, h, r: one_box(consts, A, d, l, h, r, iterations, rows))(lo, hi, reference)
        centre = (lo + hi) / 2
        at_corner, at_centre = margins(consts, C, d, corner), margins(consts, C, d, centre)
        corner_lower = at_corner < at_centre
        point = jnp.where(corner_lower.reshape(-1, *[1] * (lo.ndim - 1)), corner, centre)
        return bound, score, point, jnp.where(corner_lower, at_corner, at_centre), kept, unstable
    return box_bounds


class Bounder:
    """A :class:`Problem`'s compiled calls, with its constants and spec bound in."""

    def __init__(self, problem: Problem):
        self.problem = problem
        graph = problem.graph
        out_shape = graph.avals[graph.outputs[0]].shape
        self.args = (problem.consts, jnp.asarray(problem.C.reshape(-1, *out_shape)),
                     jnp.asarray(problem.C), jnp.asarray(problem.d))
        self._bounds = cached(graph, _box_bounds, static_argnames=("iterations", "rows"))
        self._attack = cached(graph, _attack, static_argnames=("restarts",))

    def box_bounds(self, lo, hi, reference=None, iterations: int = 0, rows: int | None = 16):
        """For a batch of boxes: CROWN lower bounds of the margin (the output's slopes
        tuned by ``iterations`` steps, a conjunction's rows combined by
        :func:`combined_rows`), a split score per input (the worst disjunct's combined
        coefficient, at least :data:`SCORE_FLOOR` of the largest, times width), a candidate counterexample per box (its centre or the
        corner that minimises that combined linear bound, whichever has the lower margin) and that
        margin, the intermediate bounds used (``{variable: Interval}``, batched) and
        the most unstable neurons in any layer under them. With ``reference`` (such
        bounds of boxes containing these), only the ``rows`` most unstable neurons per
        layer are bounded anew (:func:`sub_box_intervals`)."""
        return self._bounds(*self.args, lo, hi, reference, iterations=iterations, rows=rows)

    def attack(self, lo, hi, key, restarts: int = 5):
        """PGD on the margin in each box: the best points found and their margins."""
        consts, _, C, d = self.args
        return self._attack(consts, C, d, lo, hi, key, restarts=restarts)
