"""What every bound method shares: the graph, the concrete values of all
unperturbed variables, the input regions, rule lookup and concretisation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa import _compat
from jaxlirpa.graph import Const, Graph
from jaxlirpa.methods.patches import Patches
from jaxlirpa.rules.base import Interval, LinearBounds, Perturbed, lookup
from jaxlirpa.rules.linear import exact_precision
from jaxlirpa.sets import Region


def exact_matmuls(fn):
    """``fn`` traced with every matrix product it makes at ``rules.linear.exact_precision()``:
    full float32 where the backend's default rounds enough to make bounds unsound."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        if exact_precision() is None:
            return fn(*args, **kwargs)
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)
    return traced


def xla_options(method: str) -> dict | None:
    """XLA options for a program that bounds by ``method`` (a checked method name), on this
    backend: on CPU, for every method but ``"ibp"``, no YNNPACK library fusions (see
    ``jaxlirpa.compiler_options``); elsewhere None (XLA's defaults)."""
    if jax.default_backend() != "cpu" or method == "ibp":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def compile_bounds(fn, method: str = "crown", **jit_options):
    """``jax.jit`` of a bound computation by ``method`` that jaxlirpa owns, with
    :func:`exact_matmuls`; called outside any trace, compiled with :func:`xla_options`
    too (JAX takes them on top-level calls only; inside a user's ``jax.jit`` the user's
    compilation decides)."""
    traced = exact_matmuls(fn)
    plain, options = jax.jit(traced, **jit_options), xla_options(method)
    if options is None:
        return plain
    tuned = jax.jit(traced, compiler_options=options, **jit_options)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return (tuned if _compat.top_level() else plain)(*args, **kwargs)
    return run


class Context:
    """One example's bound computation.

    ``regions`` maps each perturbed input id to its :class:`Region`; every
    unperturbed variable is evaluated once, concretely, on construction. ``batch_axis``:
    the name under which the caller vmaps this over examples (``jax.vmap(axis_name=...)``),
    so that a choice between programs (``lax.cond``) can be made once for the whole batch.
    """

    def __init__(self, graph: Graph, consts, inputs, regions: dict[int, Region], batch_axis: str | None = None):
        self.graph = graph
        self.regions = regions
        self.batch_axis = batch_axis  # the name of the vmapped axis over examples, when there is one
        self.values = dict(zip(graph.consts, consts)) | {
            i: v for i, v in zip(graph.inputs, inputs) if i not in regions
        }
        self.perturbed_eqns = []
        for e in graph.eqns:
            if any(graph.is_perturbed(v) for v in e.inputs):
                self.perturbed_eqns.append(e)
            else:
                outs = e.prim.bind(*map(self.value, e.inputs), **e.params)
                self.values.update(zip(e.outputs, outs if e.prim.multiple_results else [outs]))
        self._rules = {e: lookup(e, self.perturbed_mask(e)) for e in self.perturbed_eqns}
        self.position = {e: k for k, e in enumerate(self.perturbed_eqns)}
        self.slopes = None  # alpha-CROWN's optimisable slopes (methods/alpha_crown.py), when active
        self.columns = {}  # alpha-CROWN: {eqn: the input elements its pulled rows keep} (crown.OnElements)

    def value(self, operand):
        return operand.value if isinstance(operand, Const) else self.values[operand]

    def perturbed_mask(self, eqn) -> tuple[bool, ...]:
        return tuple(self.graph.is_perturbed(v) for v in eqn.inputs)

    def rule(self, eqn):
        return self._rules[eqn]

    def operands(self, eqn, bounds=None, linear=None):
        """Each operand as a rule sees it: a concrete array, or :class:`Perturbed`."""
        return [
            Perturbed(interval=None if bounds is None else bounds.get(v), linear=None if linear is None else linear.get(v))
            if self.graph.is_perturbed(v) else self.value(v)
            for v in eqn.inputs
        ]

    def input_intervals(self) -> dict[int, Interval]:
        return {i: Interval(*r.interval()) for i, r in self.regions.items()}

    def concretize(self, As: dict[int, jax.Array | Patches], sign: int) -> jax.Array:
        """Sum over perturbed inputs of ``min`` (sign -1) or ``max`` (+1) of ``<A, x>``."""
        total = 0.0
        for i, A in As.items():
            region = self.regions[i]
            total = total + (A.concretize(region, sign) if isinstance(A, Patches) else region.concretize(A, sign))
        return total

    def input_linear(self) -> dict[int, LinearBounds]:
        """Forward-mode start: each input is itself, one block of rows per input."""
        sizes = {i: int(np.prod(self.graph.avals[i].shape)) for i in self.regions}
        n, offset, out = sum(sizes.values()), 0, {}
        for i, size in sizes.items():
            shape = self.graph.avals[i].shape
            dtype = self.graph.avals[i].dtype
            w = jnp.eye(n, size, -offset, dtype=dtype).reshape(n, *shape)
            b = jnp.zeros(shape, dtype)
            out[i] = LinearBounds(w, b, w, b)
            offset += size
        return out

    def split_rows(self, w: jax.Array) -> dict[int, jax.Array]:
        """Forward weights ``(n_inputs, *shape)`` as per-input ``A`` matrices ``(size, *input_shape)``."""
        flat = w.reshape(w.shape[0], -1).T
        out, offset = {}, 0
        for i in self.regions:
            shape = self.graph.avals[i].shape
            size = int(np.prod(shape))
            out[i] = flat[:, offset:offset + size].reshape(flat.shape[0], *shape)
            offset += size
        return out

    def split_rows_pair(self, lw: jax.Array, uw: jax.Array) -> dict[int, tuple[jax.Array, jax.Array]]:
        """Rows ``(rows, n_inputs)`` of linear coefficients split into per-input ``A`` matrices."""
        out, offset = {}, 0
        for i in self.regions:
            shape = self.graph.avals[i].shape
            size = int(np.prod(shape))
            cut = lambda w: w[:, offset:offset + size].reshape(w.shape[0], *shape)
            out[i] = (cut(lw), cut(uw))
            offset += size
        return out

    def concretize_linear(self, lin: LinearBounds) -> Interval:
        shape = lin.lb.shape
        lo = self.concretize(self.split_rows(lin.lw), -1).reshape(shape) + lin.lb
        hi = self.concretize(self.split_rows(lin.uw), +1).reshape(shape) + lin.ub
        return Interval(lo, hi)
