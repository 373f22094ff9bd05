"""A verification problem: a network, an input box and the output region that counts
as a counterexample, with the three things branch and bound asks of it: the margin of
a point, a search for counterexamples, and lower bounds of the margin over sub-boxes.

The output region is a disjunction of conjunctions (as VNN-LIB writes it): ``x`` is a
counterexample iff for some disjunct ``(C, d)`` every row of ``C @ f(x) <= d``. The
*margin* ``min_disjunct max_row (C @ f(x) - d)`` is therefore positive exactly where the
property holds; a box is proved when a lower bound of every disjunct's best row is.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.api import trace_per_example
from jaxlirpa.graph import Graph


def margin_of_rows(rows, d):
    """The margin from values (or lower bounds) of the rows of ``C @ f``, shape
    ``(batch, disjuncts * rows)``: each disjunct's best row, the worst disjunct."""
    rows = rows.reshape(-1, *d.shape) - d
    return jnp.min(jnp.max(rows, axis=2), axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """``fn`` on inputs of ``input_shape`` (no batch axis) inside ``[lower, upper]``;
    counterexample region ``C`` (disjuncts, rows, outputs) and ``d`` (disjuncts, rows),
    padded rows having ``d = +inf`` so they never prove anything. ``graph`` and
    ``consts`` are ``fn`` traced on one example (the bound code runs on them)."""

    fn: Callable
    input_shape: tuple[int, ...]
    lower: np.ndarray
    upper: np.ndarray
    C: np.ndarray
    d: np.ndarray
    graph: Graph
    consts: list

    @classmethod
    def from_disjuncts(cls, fn, input_shape, lower, upper, disjuncts) -> "Problem":
        if not disjuncts:
            raise ValueError("a property needs at least one output disjunct")
        rows = max(C.shape[0] for C, _ in disjuncts)
        outputs = disjuncts[0][0].shape[1]
        Cs = np.zeros((len(disjuncts), rows, outputs), np.float32)
        ds = np.full((len(disjuncts), rows), np.inf, np.float32)
        for k, (C, d) in enumerate(disjuncts):
            Cs[k, :C.shape[0]], ds[k, :C.shape[0]] = C, d
        input_shape = tuple(input_shape)
        if np.size(lower) != int(np.prod(input_shape)):
            raise ValueError(f"the property has {np.size(lower)} inputs but the network takes {input_shape}")
        lower = np.asarray(lower, np.float32).reshape(input_shape)
        upper = np.asarray(upper, np.float32).reshape(input_shape)
        if np.any(lower > upper):
            raise ValueError("the property's input box is empty (some lower bound exceeds its upper bound)")
        flat = lambda x: fn(x).reshape(x.shape[0], -1)
        graph, consts, out = trace_per_example(flat, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
        if out.shape[1] != outputs:
            raise ValueError(f"the property speaks of {outputs} outputs but the network has {out.shape[1]}")
        return cls(fn, input_shape, lower, upper, Cs, ds, graph, consts)

    def counterexample(self, x) -> tuple[np.ndarray, np.ndarray] | None:
        """``(x, fn(x))`` if ``x`` (one input) lies in the box and violates the property,
        checked by running ``fn`` itself on it; else None."""
        x = np.clip(np.asarray(x, np.float32).reshape(self.input_shape), self.lower, self.upper)
        y = np.asarray(self.fn(jnp.asarray(x)[None])).reshape(-1)
        violated = np.any(np.all(np.einsum("kro,o->kr", self.C, y) <= self.d, axis=1))
        return (x, y) if violated else None
