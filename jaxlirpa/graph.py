"""From a JAX function to a flat graph of primitive equations.

``trace`` runs ``jax.make_jaxpr`` on one example, inlines every call-like
sub-jaxpr (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``,
``closed_call``), unrolls loops (``scan``; ``while_loop`` whose trip count
is known while tracing), inlines ``cond``/``switch`` (the taken branch when
its index is known while tracing, else every branch and a ``select_n``),
marks which variables depend on a perturbed input, fuses the few patterns
whose primitive-by-primitive form is not boundable (leaky ReLU's
``select_n`` on a comparison), rewrites ``div``/``max``/``min`` of two
perturbed operands into boundable primitives and drops dead equations.
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
from jaxlirpa.rules.base import UnsupportedPrimitiveError, unsupported

MAX_UNROLLED_STEPS = 10_000
"""The longest ``while_loop`` that tracing unrolls."""


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
    callers: tuple = ()  # source infos of the enclosing calls (jit, scan, cond), innermost first

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
    builder.known = {i: None if isinstance(c, jax.core.Tracer) else c for i, c in zip(const_ids, closed.consts)}
    builder.perturbed = {i for i, m in zip(input_ids, perturbed_mask) if m}
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
        # Branches and trip counts read from constants, which the jaxpr's text omits.
        signature="\n".join([_compat.signature(closed), *builder.decisions]),
    )
    _mark_perturbed(graph)
    _fuse_patterns(graph)
    from jaxlirpa.patterns import fuse_composites  # a module that imports this one
    fuse_composites(graph)
    _rewrite_for_rules(graph, builder.branch_of)
    from jaxlirpa.layout import channels_last  # a module that imports this one
    channels_last(graph, builder.branch_of)
    _guard_branches(graph, builder.branch_of)
    _drop_dead(graph)
    _mark_perturbed(graph)
    return graph, list(closed.consts)


class _Builder:
    """Inlines jaxprs into one flat list of equations.

    ``known`` holds the values known while tracing (constants, and what is
    computed from them alone, evaluated on demand): they decide ``cond``
    branches and ``while_loop`` trip counts. ``scope`` is the predicate
    variable "this branch is taken" while a branch picked at run time is
    inlined; ``branch_of`` records it for every variable made there.
    """

    def __init__(self, avals=None):
        self.eqns: list[Eqn] = []
        self.avals: dict[int, Any] = {} if avals is None else avals
        self.known: dict[int, Any] = {}
        self.perturbed: set[int] = set()
        self.producer: dict[int, Eqn] = {}
        self.scope = None
        self.callers: tuple = ()
        self.branch_of: dict[int, int] = {}
        self.decisions: list[str] = []

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
            outer, self.callers = self.callers, (eqn.source_info, *self.callers)
            if eqn.primitive.name == "scan":
                outs = self.unroll_scan(eqn, ins)
            elif eqn.primitive.name == "split":
                outs = self.call(_as_slices(eqn.params["sizes"], eqn.params["axis"]), ins)
            elif eqn.primitive.name == "cond" and self.any_perturbed(ins):
                outs = self.inline_cond(eqn, ins)
            elif eqn.primitive.name == "while" and self.any_perturbed(ins):
                outs = self.unroll_while(eqn, ins)
            elif body is not None:
                sub, consts = body
                outs = self.inline_closed(sub, consts, ins)
            else:
                outs = self.emit(eqn, ins, outer)
            self.callers = outer
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, _compat.DropVar):
                    env[v] = o
        return [self.read(env, v) for v in jaxpr.outvars]

    def inline_closed(self, jaxpr, consts, ins) -> list:
        env = dict(zip(jaxpr.invars, ins)) | {cv: Const(c) for cv, c in zip(jaxpr.constvars, consts)}
        return self.inline(jaxpr, env)

    def emit(self, eqn, ins, callers=()) -> list[int]:
        outs = [self.fresh(v.aval) for v in eqn.outvars]
        e = Eqn(eqn.primitive, tuple(ins), tuple(outs), dict(eqn.params), tuple(v.aval for v in eqn.invars),
                tuple(v.aval for v in eqn.outvars), eqn.source_info, callers)
        self.eqns.append(e)
        self.producer.update(dict.fromkeys(outs, e))
        if self.any_perturbed(ins):
            self.perturbed.update(outs)
        if self.scope is not None:
            self.branch_of.update(dict.fromkeys(outs, self.scope))
        return outs

    def any_perturbed(self, operands) -> bool:
        return any(isinstance(o, int) and o in self.perturbed for o in operands)

    def known_value(self, operand):
        """The value of ``operand`` if it is known while tracing, else None."""
        if isinstance(operand, Const):
            return operand.value
        stack = [operand]
        while stack:
            v = stack[-1]
            e = self.producer.get(v)
            if v in self.known or e is None or v in self.perturbed:
                self.known.setdefault(v, None)
                stack.pop()
                continue
            missing = [u for u in e.inputs if isinstance(u, int) and u not in self.known]
            if missing:
                stack += missing
                continue
            args = [u.value if isinstance(u, Const) else self.known[u] for u in e.inputs]
            outs = [None] * len(e.outputs)
            if all(a is not None for a in args):
                with jax.ensure_compile_time_eval():
                    outs = e.prim.bind(*args, **e.params)
                outs = outs if e.prim.multiple_results else [outs]
            self.known.update(zip(e.outputs, outs))
            stack.pop()
        return self.known[operand]

    def call(self, fn, operands, source_info=None) -> list:
        """Inline ``fn`` traced on the operands' shapes: small glue equations
        written by JAX itself, so their parameters stay right across releases.
        ``source_info`` (the equation they stand for) names the user's line in errors."""
        avals = [jax.ShapeDtypeStruct(np.shape(o.value), jax.numpy.result_type(o.value)) if isinstance(o, Const)
                 else jax.ShapeDtypeStruct(self.avals[o].shape, self.avals[o].dtype) for o in operands]
        closed = _compat.make_jaxpr(fn, *avals)
        start = len(self.eqns)
        outs = self.inline_closed(closed.jaxpr, closed.consts, operands)
        if source_info is not None:
            self.eqns[start:] = [dataclasses.replace(e, source_info=source_info) for e in self.eqns[start:]]
        return outs

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
            outs = self.inline_closed(body.jaxpr, body.consts, [*consts, *carry, *x_t])
            carry, y_t = outs[:n_carry], outs[n_carry:]
            ys.append(y_t)
        if p["reverse"]:
            ys.reverse()
        stacked = [self.call(lambda *a: jax.numpy.stack(a), list(col))[0] for col in zip(*ys)] if ys else []
        return [*carry, *stacked]

    def unroll_while(self, eqn, ins) -> list:
        """``while_loop`` unrolled while its condition is known while tracing
        (``fori_loop`` with ``jnp.int32`` bounds), up to :data:`MAX_UNROLLED_STEPS`."""
        p = eqn.params
        cond, body = p["cond_jaxpr"], p["body_jaxpr"]
        cond_consts, rest = ins[:p["cond_nconsts"]], ins[p["cond_nconsts"]:]
        body_consts, carry = rest[:p["body_nconsts"]], rest[p["body_nconsts"]:]
        for step in range(MAX_UNROLLED_STEPS + 1):
            start = len(self.eqns)
            go, = self.inline_closed(cond.jaxpr, cond.consts, [*cond_consts, *carry])
            value = self.known_value(go)
            del self.eqns[start:]  # the condition only steers the unrolling
            if value is None:
                why = ("its condition depends on the perturbed input" if self.any_perturbed([go])
                       else "its condition reads values not known while tracing")
                raise _unsupported(eqn, ins, self.perturbed,
                                   f"{why}, so its trip count is unknown; write the loop with lax.scan, or "
                                   f"fori_loop with Python int bounds (both are unrolled)")
            if not value:
                self.decisions.append(f"while: {step} steps")
                return carry
            if step == MAX_UNROLLED_STEPS:
                raise _unsupported(eqn, ins, self.perturbed,
                                   f"it runs more than {MAX_UNROLLED_STEPS} steps, each unrolled into the bounded "
                                   f"graph; bound a shorter loop")
            carry = self.inline_closed(body.jaxpr, body.consts, [*body_consts, *carry])

    def inline_cond(self, eqn, ins) -> list:
        """``cond``/``switch``: the taken branch when the index is known while
        tracing; otherwise every branch, and ``select_n`` of their outputs by the
        index (linear in the branches' outputs, since the index is not perturbed)."""
        branches, (index, *operands) = eqn.params["branches"], ins
        if self.any_perturbed([index]):
            raise _unsupported(eqn, ins, self.perturbed,
                               "which branch runs depends on the perturbed input, so the function may jump "
                               "inside the input set; write both branches as values and combine them "
                               "with arithmetic (a max, a product with an indicator) instead")
        last = len(branches) - 1
        taken = self.known_value(index)
        if taken is not None:
            k = int(np.clip(taken, 0, last))
            self.decisions.append(f"cond: branch {k}")
            return self.inline_closed(branches[k].jaxpr, branches[k].consts, operands)
        self.decisions.append("cond: every branch")
        index, = self.call(lambda i: jax.numpy.clip(i, 0, last), [index], eqn.source_info)
        outer, results = self.scope, []
        for k, branch in enumerate(branches):
            if outer is None:
                self.scope, = self.call(lambda i: i == k, [index], eqn.source_info)
            else:
                self.scope, = self.call(lambda o, i: o & (i == k), [outer, index], eqn.source_info)
            results.append(self.inline_closed(branch.jaxpr, branch.consts, operands))
        self.scope = outer
        return [self.call(lambda i, *cases: jax.lax.select_n(i, *cases), [index, *cases], eqn.source_info)[0]
                for cases in zip(*results)]


def _as_slices(sizes, axis):
    """``split`` (several outputs, which the methods do not carry) as one ``slice`` per part."""
    starts = np.cumsum([0, *sizes])
    return lambda a: [jax.lax.slice_in_dim(a, int(s), int(e), axis=axis) for s, e in zip(starts[:-1], starts[1:])]


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


def _unsupported(eqn, operands, perturbed: set[int], why: str) -> UnsupportedPrimitiveError:
    """:func:`jaxlirpa.rules.base.unsupported` for a construct that tracing refuses."""
    return unsupported(eqn.primitive.name, [v.aval for v in eqn.invars],
                       [isinstance(o, int) and o in perturbed for o in operands], _compat.user_location(eqn), why)


# ---------------------------------------------------------------- rewrites

# Identities whose right-hand sides the rules bound: the reciprocal (``c / y``, rules/convex.py)
# and the product of two perturbed tensors (rules/bilinear.py), as auto_LiRPA's BoundDiv; a ReLU
# of the difference, which is then bounded as one variable (tighter than from x and y apart)
# and which branch and bound can split.
_TWO_PERTURBED = {
    P.div_p: lambda x, y: x * (1 / y),
    P.max_p: lambda x, y: y + jax.numpy.maximum(x - y, 0),
    P.min_p: lambda x, y: x - jax.numpy.maximum(x - y, 0),
}
# Elementwise primitives whose rule for one perturbed operand is elementwise in it (an
# ElementwiseRule), so that operand must have the output's shape.
_ELEMENTWISE = {P.max_p, P.min_p, P.div_p, P.pow_p}


def _rewrite_for_rules(graph: Graph, branch_of: dict[int, int]) -> None:
    """Replace ``div``/``max``/``min`` of two perturbed operands by :data:`_TWO_PERTURBED`,
    ``max``/``min`` that return their operand (:func:`_is_identity`) by a copy of it, and
    broadcast explicitly a perturbed operand that an elementwise primitive broadcasts
    implicitly (``max(f32[1,4,1], f32[1,4,4])``, which JAX 0.10 allows for size-1 axes)."""
    eqns = []
    for e in graph.eqns:
        perturbed = [graph.is_perturbed(v) for v in e.inputs]
        if (e.prim not in _ELEMENTWISE or not any(perturbed)
                or not jax.numpy.issubdtype(e.out_avals[0].dtype, jax.numpy.floating)):
            eqns.append(e)
        elif e.prim in (P.max_p, P.min_p) and _is_identity(e, perturbed):
            x = e.inputs[perturbed.index(True)]
            eqns.append(Eqn(P.copy_p, (x,), e.outputs, {}, (graph.avals[x],), e.out_avals, e.source_info))
        elif all(perturbed) and e.prim in _TWO_PERTURBED:
            eqns += _expand(graph, e, _TWO_PERTURBED[e.prim], branch_of)
        elif any(p and a.shape != e.out_avals[0].shape for p, a in zip(perturbed, e.in_avals)):
            broadcast = lambda *ops, e=e, perturbed=perturbed: e.prim.bind(
                *[jax.numpy.broadcast_to(o, e.out_avals[0].shape) if p else o for o, p in zip(ops, perturbed)],
                **e.params)
            eqns += _expand(graph, e, broadcast, branch_of)
        else:
            eqns.append(e)
    graph.eqns = eqns


def _is_identity(e: Eqn, perturbed: list[bool]) -> bool:
    """``max(x, x)``, ``min(x, x)``; ``max(x, -inf)`` (softmax's lowering), ``min(x, inf)``."""
    if all(perturbed):
        return e.inputs[0] == e.inputs[1]
    c = e.inputs[1] if perturbed[0] else e.inputs[0]
    neutral = -np.inf if e.prim is P.max_p else np.inf
    return (isinstance(c, Const) and e.in_avals[perturbed.index(True)].shape == e.out_avals[0].shape
            and bool(np.all(np.asarray(c.value) == neutral)))


def _expand(graph: Graph, e: Eqn, fn, branch_of: dict[int, int]) -> list[Eqn]:
    """The equations of ``fn`` traced on ``e``'s operands, computing ``e``'s output."""
    builder = _Builder(graph.avals)
    result, = builder.call(fn, list(e.inputs), e.source_info)
    rename = lambda v: e.outputs[0] if v == result else v
    eqns = [dataclasses.replace(n, inputs=tuple(map(rename, n.inputs)), outputs=tuple(map(rename, n.outputs)))
            for n in builder.eqns]
    if e.outputs[0] in branch_of:
        branch_of.update({v: branch_of[e.outputs[0]] for n in eqns for v in n.outputs})
    return eqns


def _guard_branches(graph: Graph, branch_of: dict[int, int]) -> None:
    """Every perturbed value made in a branch chosen at run time becomes
    ``select_n(taken, 0, value)``: the same value where the branch is taken, and
    where it is not, bounds ``[0, 0]`` for the rest of that branch. So a branch
    that is not taken cannot spoil the bounds (a ``log`` whose input may be
    negative there would give infinite bounds, then NaN ones, and a NaN times
    the zero coefficient that ``select_n`` passes back is still NaN)."""
    if not branch_of:
        return
    _mark_perturbed(graph)
    eqns = []
    for e in graph.eqns:
        outputs, guards = list(e.outputs), []
        for k, v in enumerate(e.outputs):
            aval = graph.avals[v]
            if (v not in branch_of or not graph.is_perturbed(v)
                    or not jax.numpy.issubdtype(aval.dtype, jax.numpy.floating)):
                continue
            outputs[k] = len(graph.avals)
            graph.avals[outputs[k]] = aval
            taken = branch_of[v]
            guards.append(Eqn(P.select_n_p, (taken, Const(np.zeros(aval.shape, aval.dtype)), outputs[k]), (v,), {},
                              (graph.avals[taken], aval, aval), (aval,), e.source_info))
        eqns += [dataclasses.replace(e, outputs=tuple(outputs)), *guards]
    graph.eqns = eqns


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
