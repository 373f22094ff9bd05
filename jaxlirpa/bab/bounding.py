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
from jaxlirpa.methods.context import Context
from jaxlirpa.methods.beta_crown import optimised_lower
from jaxlirpa.methods.crown import crown_intervals
from jaxlirpa.sets import Region

_COMPILED: dict[tuple, Callable] = {}


def cached(graph: Graph, build: Callable[[Graph], Callable], **jit_options) -> Callable:
    """``build(graph)``, compiled once per graph signature."""
    key = (graph.signature, build.__name__)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(build(graph), **jit_options)
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


def _box_bounds(graph: Graph):
    margins = margins_fn(graph)
    out = graph.outputs[0]

    def one_box(consts, A, d, lo, hi, iterations):
        ctx = box_context(graph, consts, lo, hi)
        rows, _, input_A, _ = optimised_lower(ctx, out, A, crown_intervals(ctx), iterations=iterations)
        # The decisive row's input coefficients times the widths: how much halving each
        # input could move the bound (alpha-beta-CROWN's "smart" input branching).
        per_row = rows.reshape(d.shape) - d
        worst = jnp.argmin(jnp.max(per_row, axis=1))
        decisive = input_A.reshape(*d.shape, -1)[worst, jnp.argmax(per_row[worst])]
        return margin_of_rows(rows[None], d)[0], jnp.abs(decisive) * (hi - lo).reshape(-1)

    def box_bounds(consts, A, C, d, lo, hi, iterations: int):
        bound, score = jax.vmap(lambda l, h: one_box(consts, A, d, l, h, iterations))(lo, hi)
        return bound, score, margins(consts, C, d, (lo + hi) / 2)
    return box_bounds

class Bounder:
    """A :class:`Problem`'s compiled calls, with its constants and spec bound in."""

    def __init__(self, problem: Problem):
        self.problem = problem
        graph = problem.graph
        out_shape = graph.avals[graph.outputs[0]].shape
        self.args = (problem.consts, jnp.asarray(problem.C.reshape(-1, *out_shape)),
                     jnp.asarray(problem.C), jnp.asarray(problem.d))
        self._bounds = cached(graph, _box_bounds, static_argnames=("iterations",))
        self._attack = cached(graph, _attack, static_argnames=("restarts",))

    def box_bounds(self, lo, hi, iterations: int = 0):
        """For a batch of boxes: CROWN lower bounds of the margin (the output's slopes
        tuned by ``iterations`` steps), a split score per input (coefficient times
        width) and the margin at each box's centre."""
        return self._bounds(*self.args, lo, hi, iterations=iterations)

    def attack(self, lo, hi, key, restarts: int = 5):
        """PGD on the margin in each box: the best points found and their margins."""
        consts, _, C, d = self.args
        return self._attack(consts, C, d, lo, hi, key, restarts=restarts)
