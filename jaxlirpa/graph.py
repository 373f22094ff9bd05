"""From a JAX function to a flat graph of primitive equations.

``trace`` runs ``jax.make_jaxpr`` on one example, inlines every call-like
sub-jaxpr (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``,
``closed_call``), marks which variables depend on a perturbed input, fuses
the few patterns whose primitive-by-primitive form is not boundable
(leaky ReLU's ``select_n`` on a comparison) and drops dead equations.
Variables are small integers so that one sub-jaxpr inlined twice gets
fresh names each time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxlirpa import _compat
from jaxlirpa._compat import lax_primitives as P


@dataclasses.dataclass(frozen=True)
class Const:
    """A literal operand: a value known when the graph is traced."""

    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Eqn:
    """One primitive application: ``outputs = prim.bind(*inputs, **params)``."""

    prim: _compat.Primitive
    inputs: tuple  # int variable ids or Const
    outputs: tuple[int, ...]
    params: dict
    in_avals: tuple
    out_avals: tuple
    source_info: Any = None

    def location(self) -> str:
        return _compat.user_location(self) if self.source_info is not None else "<unknown location>"


@dataclasses.dataclass(eq=False)
class Graph:
    """A flat, inlined jaxpr with perturbation marks.

    ``inputs`` are the traced function's arguments (perturbed ones listed in
    ``perturbed_inputs``), ``consts`` the ids bound to the closed jaxpr's
    constants, ``avals`` the shape and dtype of every variable.
    """

    inputs: list[int]
    perturbed_inputs: list[int]
    consts: list[int]
    eqns: list[Eqn]
    outputs: list[Any]
    avals: dict[int, Any]
    perturbed: set[int]
    signature: str = ""

    def producer(self) -> dict[int, Eqn]:
        return {v: e for e in self.eqns for v in e.outputs}

    def consumers(self) -> dict[int, list[Eqn]]:
        users: dict[int, list[Eqn]] = {}
        for e in self.eqns:
            for v in e.inputs:
                if isinstance(v, int):
                    users.setdefault(v, []).append(e)
        return users

    def is_perturbed(self, operand) -> bool:
        return isinstance(operand, int) and operand in self.perturbed

    def evaluate(self, consts, inputs) -> list:
        """Run the graph on values (concrete or traced): its outputs. Graphs of one
        signature share this code under jit, whatever their constants."""
        env = dict(zip(self.consts, consts)) | dict(zip(self.inputs, inputs))
        value = lambda o: o.value if isinstance(o, Const) else env[o]
        for e in self.eqns:
            outs = e.prim.bind(*map(value, e.inputs), **e.params)
            env.update(zip(e.outputs, outs if e.prim.multiple_results else [outs]))
        return [value(o) for o in self.outputs]


def trace(fn: Callable, example_args: list, perturbed_mask: list[bool]) -> tuple[Graph, list]:
    """Trace ``fn(*example_args)`` into a :class:`Graph` and its const values.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct``; only shapes and
    dtypes are used. Returns the graph and the constant values (possibly
    tracers of an enclosing transformation, so gradients flow through them).
    """
    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in example_args]
    closed = _compat.make_jaxpr(fn, *avals)
    builder = _Builder()
    const_ids = [builder.fresh(v.aval) for v in closed.jaxpr.constvars]
    input_ids = [builder.fresh(v.aval) for v in closed.jaxpr.invars]
    env = dict(zip(closed.jaxpr.constvars, const_ids)) | dict(zip(closed.jaxpr.invars, input_ids))
    outputs = builder.inline(closed.jaxpr, env)
    graph = Graph(
        inputs=input_ids,
        perturbed_inputs=[i for i, m in zip(input_ids, perturbed_mask) if m],
        consts=const_ids,
        eqns=builder.eqns,
        outputs=outputs,
        avals=builder.avals,
        perturbed=set(),
        signature=_compat.signature(closed),
    )
    _mark_perturbed(graph)
    _fuse_patterns(graph)
    _drop_dead(graph)
    _mark_perturbed(graph)
    return graph, list(closed.consts)


class _Builder:
    def __init__(self):
        self.eqns: list[Eqn] = []
        self.avals: dict[int, Any] = {}

    def fresh(self, aval) -> int:
        i = len(self.avals)
        self.avals[i] = aval
        return i

    def read(self, env, v):
        if isinstance(v, _compat.Literal):
            return Const(v.val)
        return env[v]

    def inline(self, jaxpr, env) -> list:
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            body = _compat.call_body(eqn)
            if eqn.primitive.name == "scan":
                outs = self.unroll_scan(eqn, ins)
            elif body is not None:
                sub, consts = body
                sub_env = dict(zip(sub.invars, ins))
                sub_env |= {cv: Const(c) for cv, c in zip(sub.constvars, consts)}
                outs = self.inline(sub, sub_env)
            else:
                outs = [self.fresh(v.aval) for v in eqn.outvars]
                self.eqns.append(Eqn(eqn.primitive, tuple(ins), tuple(outs), dict(eqn.params),
                                     tuple(v.aval for v in eqn.invars), tuple(v.aval for v in eqn.outvars),
                                     eqn.source_info))
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, _compat.DropVar):
                    env[v] = o
        return [self.read(env, v) for v in jaxpr.outvars]

    def call(self, fn, operands) -> list:
        """Inline ``fn`` traced on the operands' shapes: small glue equations
        written by JAX itself, so their parameters stay right across releases."""
        avals = [jax.ShapeDtypeStruct(np.shape(o.value), jax.numpy.result_type(o.value)) if isinstance(o, Const)
                 else jax.ShapeDtypeStruct(self.avals[o].shape, self.avals[o].dtype) for o in operands]
        closed = _compat.make_jaxpr(fn, *avals)
        env = dict(zip(closed.jaxpr.invars, operands)) | {c: Const(v) for c, v in zip(closed.jaxpr.constvars, closed.consts)}
        return self.inline(closed.jaxpr, env)

    def unroll_scan(self, eqn, ins) -> list:
        """``lax.scan`` (and ``fori_loop`` with a static trip count) as its body
        inlined once per step: recurrent networks become ordinary graphs."""
        p = eqn.params
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, carry, xs = ins[:n_consts], list(ins[n_consts:n_consts + n_carry]), ins[n_consts + n_carry:]
        ys = []
        for t in (reversed(range(length)) if p["reverse"] else range(length)):
            x_t = [self.call(lambda a, t=t: a[t], [x])[0] for x in xs]
            env = dict(zip(body.jaxpr.invars, [*consts, *carry, *x_t]))
            env |= {c: Const(v) for c, v in zip(body.jaxpr.constvars, body.consts)}
            outs = self.inline(body.jaxpr, env)
            carry, y_t = outs[:n_carry], outs[n_carry:]
            ys.append(y_t)
        if p["reverse"]:
            ys.reverse()
        stacked = [self.call(lambda *a: jax.numpy.stack(a), list(col))[0] for col in zip(*ys)] if ys else []
        return [*carry, *stacked]


def _mark_perturbed(graph: Graph) -> None:
    perturbed = set(graph.perturbed_inputs)
    for e in graph.eqns:
        if any(isinstance(v, int) and v in perturbed for v in e.inputs):
            perturbed.update(e.outputs)
    graph.perturbed = perturbed


def _drop_dead(graph: Graph) -> None:
    live = {v for v in graph.outputs if isinstance(v, int)}
    kept = []
    for e in reversed(graph.eqns):
        if any(v in live for v in e.outputs):  # effects (debug prints) are dropped too
            kept.append(e)
            live.update(v for v in e.inputs if isinstance(v, int))
    graph.eqns = kept[::-1]


# ---------------------------------------------------------------- patterns

leaky_relu_p = _compat.define_primitive("jaxlirpa_leaky_relu", lambda x, slope: jax.numpy.where(x >= 0, x, slope * x))
"""``x if x >= 0 else slope * x``, fused from ``select_n(x >= 0, slope * x, x)``."""

_POSITIVE_WHEN_TRUE = {P.ge_p: True, P.gt_p: True, P.le_p: False, P.lt_p: False}


def _is_zero(operand) -> bool:
    return isinstance(operand, Const) and np.ndim(operand.value) == 0 and operand.value == 0


def _fuse_patterns(graph: Graph) -> None:
    """Rewrite ``select_n(x >= 0, a * x, x)`` (leaky ReLU, ``jnp.where``) in place."""
    producer = graph.producer()
    for k, e in enumerate(graph.eqns):
        if e.prim is not P.select_n_p or len(e.inputs) != 3 or not graph.is_perturbed(e.inputs[0]):
            continue
        cmp = producer.get(e.inputs[0])
        if cmp is None or cmp.prim not in _POSITIVE_WHEN_TRUE:
            continue
        a, b = cmp.inputs
        positive_when_true = _POSITIVE_WHEN_TRUE[cmp.prim]
        if _is_zero(a) and isinstance(b, int):
            x, positive_when_true = b, not positive_when_true
        elif _is_zero(b) and isinstance(a, int):
            x = a
        else:
            continue
        negative_case, positive_case = e.inputs[1], e.inputs[2]
        if not positive_when_true:
            negative_case, positive_case = positive_case, negative_case
        scaled = producer.get(negative_case)
        if positive_case != x or scaled is None or scaled.prim is not P.mul_p:
            continue
        if scaled.inputs[0] == x and not graph.is_perturbed(scaled.inputs[1]):
            slope = scaled.inputs[1]
        elif scaled.inputs[1] == x and not graph.is_perturbed(scaled.inputs[0]):
            slope = scaled.inputs[0]
        else:
            continue
        slope_aval = graph.avals[slope] if isinstance(slope, int) else jax.ShapeDtypeStruct(np.shape(slope.value), jax.numpy.result_type(slope.value))
        graph.eqns[k] = Eqn(leaky_relu_p, (x, slope), e.outputs, {}, (graph.avals[x], slope_aval), e.out_avals, e.source_info)
