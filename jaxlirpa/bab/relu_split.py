"""Branch and bound over ReLU splits with beta-CROWN bounds (alpha-beta-CROWN's loop).

The root is bounded by alpha-CROWN, whose intermediate bounds every domain then
shares (cut at its own splits, as alpha-beta-CROWN does by default). A domain is its
split signs, its alpha (output slopes) and beta (split multipliers), each an array
with a leading domain axis on the host; one compiled call optimises alpha and beta
for a whole batch of children and returns, per child, the margin bound, the input
point minimising the decisive row's linear bound (checked as a counterexample) and
the neuron to split next: the largest BaBSR-style intercept score
``max(-a, 0) * (-(l - k)(u - k) / (u - l))`` among unstable unsplit neurons, ``a``
the bound's coefficient on the neuron's output. Neurons whose output never reaches
the bound (``a == 0``, e.g. grafted ones multiplied by a constant 0) are never split.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.bab.bounding import box_context, cached, margins_fn
from jaxlirpa.bab.input_split import pad, padded_size
from jaxlirpa.bab.problem import Problem, margin_of_rows
from jaxlirpa.bab.report import Outcome, Progress
from jaxlirpa.graph import Graph
from jaxlirpa.methods.alpha_crown import AlphaOptions, alpha_crown
from jaxlirpa.methods.beta_crown import apply_splits, kinks, optimised_lower, splittable


def _decisive(rows, d):
    """Index of the row deciding the margin: the worst disjunct's best row."""
    per = rows.reshape(d.shape) - d
    worst = jnp.argmin(jnp.max(per, axis=1))
    return worst * d.shape[1] + jnp.argmax(per[worst])


def _root(graph: Graph):
    out = graph.outputs[0]

    def root(consts, A, d, lo, hi, iterations: int):
        ctx = box_context(graph, consts, lo, hi)
        opts = AlphaOptions(iterations=iterations, bound="lower")
        interval, slopes, bounds = alpha_crown(ctx, out, A, opts)
        output_slopes = {k: a for k, a in slopes.items() if k.endswith(f":{out}")}
        return margin_of_rows(interval.lower[None], d)[0], output_slopes, bounds
    return root


def _children(graph: Graph):
    out = graph.outputs[0]

    def one(consts, A, d, lo, hi, root_bounds, splits, alphas, betas, iterations: int):
        ctx = box_context(graph, consts, lo, hi)
        rows, params, (input_A, _), seen = optimised_lower(ctx, out, A, root_bounds, iterations=iterations,
                                                           alphas=alphas, splits=splits, betas=betas)
        kink = kinks(ctx, root_bounds)
        bounds = apply_splits(root_bounds, splits, kink)
        row = _decisive(rows, d)
        primal = jnp.where(input_A[row] > 0, lo, hi)
        scores = []
        for v, eqn in splittable(ctx).items():
            l, u = bounds[v]
            a = seen[eqn.outputs[0]][0][row] if eqn.outputs[0] in seen else jnp.zeros_like(l)
            gap = jnp.where((l < kink[v]) & (u > kink[v]) & (splits[v] == 0) & (a != 0),
                            -(l - kink[v]) * (u - kink[v]) / jnp.maximum(u - l, 1e-12), -jnp.inf)
            scores.append(jnp.where(jnp.isfinite(gap), jnp.maximum(-a, 0) * gap + 1e-9 * gap, -jnp.inf).reshape(-1))
        return margin_of_rows(rows[None], d)[0], primal, jnp.concatenate(scores), params

    def children(consts, A, d, lo, hi, root_bounds, splits, alphas, betas, iterations: int):
        per_domain = (None,) * 6 + (0, 0, 0)
        return jax.vmap(lambda *a: one(*a, iterations), in_axes=per_domain)(
            consts, A, d, lo, hi, root_bounds, splits, alphas, betas)
    return children


class _Domains:
    """Open domains on the host: split signs, slopes, multipliers, bound, next neuron."""

    def __init__(self):
        self.parts = []

    def add(self, splits, alphas, betas, bound, neuron):
        keep = bound <= 0
        if keep.any():
            pick = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a)[keep], tree)
            self.parts.append((pick(splits), pick(alphas), pick(betas), bound[keep], neuron[keep]))

    def __len__(self):
        return sum(len(p[3]) for p in self.parts)

    def take(self, n):
        """The ``n`` open domains with the lowest bounds."""
        merged = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *self.parts)
        order = np.argsort(merged[3])
        first, rest = order[:n], order[n:]
        pick = lambda idx: jax.tree_util.tree_map(lambda a: a[idx], merged)
        self.parts = [pick(rest)] if len(rest) else []
        return pick(first)


def relu_split(problem: Problem, bounder, deadline: float, *, batch: int = 256, iterations: int = 10,
               root_iterations: int = 20, max_domains: int = 100_000, progress: Progress | None = None) -> Outcome:
    """Prove the property on ``problem``'s box by splitting ReLU neurons, or find a
    counterexample, before ``deadline`` (a ``time.monotonic()`` value)."""
    graph = problem.graph
    consts, A, C, d = bounder.args
    lo, hi = jnp.asarray(problem.lower), jnp.asarray(problem.upper)
    margin0, alphas, root_bounds = cached(graph, _root, static_argnames=("iterations",))(
        consts, A, d, lo, hi, iterations=root_iterations)
    if float(margin0) > 0:
        return Outcome("unsat", domains=1, best_bound=float(margin0))
    expand = cached(graph, _children, static_argnames=("iterations",))
    margins = cached(graph, margins_fn)
    variables = splittable_vars(graph, consts, lo, hi)
    sizes = [int(np.prod(graph.avals[v].shape)) for v in variables]
    offsets = np.cumsum([0] + sizes)
    rows = A.shape[0]
    splits = {v: np.zeros((1, *graph.avals[v].shape), np.int8) for v in variables}
    betas = {v: np.zeros((1, rows, *graph.avals[v].shape), np.float32) for v in variables}
    alphas = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], alphas)
    # The root's own bound and branching choice: one child-evaluation without a split.
    bound, primal, scores, (alphas, betas) = expand(consts, A, d, lo, hi, root_bounds, splits, alphas, betas,
                                                    iterations=0)
    domains, visited, best = _Domains(), 1, float(margin0)
    if not np.isfinite(np.asarray(scores).max()):  # nothing left to split
        return Outcome("unknown", domains=visited, best_bound=best)
    domains.add(splits, alphas, betas, np.asarray(bound), np.asarray(scores).argmax(axis=1))
    while len(domains):
        if time.monotonic() > deadline:
            return Outcome("timeout", domains=visited, best_bound=best)
        if len(domains) > max_domains:
            return Outcome("unknown", domains=visited, best_bound=best)
        splits, alphas, betas, bound, neuron = domains.take(batch)
        best = float(bound.min())
        n = len(bound)
        layer = np.searchsorted(offsets, neuron, side="right") - 1
        children = [jax.tree_util.tree_map(lambda a: np.concatenate([a, a]), t) for t in (splits, alphas, betas)]
        splits2 = {v: s.copy() for v, s in children[0].items()}
        for k in range(2 * n):
            v = variables[layer[k % n]]
            splits2[v].reshape(2 * n, -1)[k, neuron[k % n] - offsets[layer[k % n]]] = 1 if k < n else -1
        size = padded_size(2 * n, 2 * batch)
        padded = lambda tree: jax.tree_util.tree_map(lambda a: pad(a, size), tree)
        out = expand(consts, A, d, lo, hi, root_bounds, padded(splits2), padded(children[1]), padded(children[2]),
                     iterations=iterations)
        bound2, primal2, scores2, (alphas2, betas2) = jax.tree_util.tree_map(lambda a: np.asarray(a)[:2 * n], out)
        visited += 2 * n
        candidates = np.asarray(margins(consts, C, d, jnp.asarray(primal2)))
        for k in np.flatnonzero((candidates <= 0) & (bound2 <= 0)):
            cex = problem.counterexample(primal2[k])
            if cex is not None:
                return Outcome("sat", counterexample=cex, domains=visited, best_bound=best)
        stuck = (bound2 <= 0) & ~np.isfinite(scores2.max(axis=1))
        if stuck.any():  # every neuron split and still not proved: beyond this search
            return Outcome("unknown", domains=visited, best_bound=best)
        domains.add(splits2, alphas2, betas2, bound2, scores2.argmax(axis=1))
        if progress is not None:
            progress.update(len(domains), best, visited)
    return Outcome("unsat", domains=visited, best_bound=best)


def splittable_vars(graph, consts, lo, hi) -> list[int]:
    """The splittable variables of the graph, in order."""
    return list(splittable(box_context(graph, consts, lo, hi)))
