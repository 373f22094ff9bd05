"""CROWN: backward linear bound propagation (Zhang et al. 2018; Xu et al. 2020).

``pull_back`` carries ``A @ v`` from a variable ``v`` back through every rule
(optionally stopping at chosen variables); ``backward`` then concretises the
result over the input sets. Intermediate bounds (the inputs of nonlinear
rules) come from CROWN itself, in topological order, or from IBP (CROWN-IBP).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.methods import patches
from jaxlirpa.methods.context import Context
from jaxlirpa.methods.patches import Patches
from jaxlirpa.rules.base import Interval, Perturbed


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


IDENTITY = object()
"""Stands for the identity rows of a variable until a rule needs them as an array."""


@dataclasses.dataclass(frozen=True, eq=False)
class OnElements:
    """Coefficients that are zero except on the elements ``index`` (flat, shape ``(k,)``)
    of a variable: ``A`` of shape ``(rows, k)``, or, when None, the identity rows of those
    elements. alpha-CROWN re-bounds just the neurons whose bounds still matter (identity
    rows) and drops the columns of neurons a ReLU holds constant (rows through it)."""

    index: jax.Array
    A: jax.Array | None = None

    def dense(self, aval) -> jax.Array:
        n = int(np.prod(aval.shape))
        if self.A is None:
            return jax.nn.one_hot(self.index, n, dtype=aval.dtype).reshape(-1, *aval.shape)
        return jnp.zeros((self.A.shape[0], n), self.A.dtype).at[:, self.index].set(self.A).reshape(-1, *aval.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class SharedColumns:
    """Lower and upper coefficients on the elements ``index`` whose first ``common.shape[1]``
    columns are the same on both sides: rows that reached a ReLU as one array keep it at
    the neurons the ReLU passes through unchanged (active), so the next dense layer
    multiplies those columns once for both sides instead of twice."""

    index: jax.Array
    common: jax.Array
    lower: jax.Array
    upper: jax.Array

    def side(self, upper: bool) -> OnElements:
        return OnElements(self.index, jnp.concatenate([self.common, self.upper if upper else self.lower], axis=1))

    def through(self, J, bias):
        """``(lA @ J, lA @ bias)`` and ``(uA @ J, uA @ bias)`` for ``J`` of shape ``(n, ...)``
        and ``bias`` of shape ``(n,)``; ``J`` None stands for the identity (``self`` stays)."""
        s = self.common.shape[1]
        bk = bias[self.index]
        common_bias = self.common @ bk[:s]
        if J is None:
            return (self, common_bias + self.lower @ bk[s:]), (self, common_bias + self.upper @ bk[s:])
        Jk = J[self.index].reshape(self.index.shape[0], int(np.prod(J.shape[1:])))  # no -1: k may be 0
        common = self.common @ Jk[:s]
        side = lambda rest: ((common + rest @ Jk[s:]).reshape(-1, *J.shape[1:]), common_bias + rest @ bk[s:])  # noqa: E731
        return side(self.lower), side(self.upper)


def _shortcut_step(ctx: Context, eqn, ops, A_l, A_u):
    """Pull identity rows or :class:`OnElements` through ``eqn`` by the rule's identity
    shortcut (a bias ``add``, a dense layer), if it has one."""
    shortcut = getattr(ctx.rule(eqn), "pull_identity", None)
    found = shortcut(eqn, ops) if shortcut is not None else None
    if found is None:
        return None
    J, bias = found  # the identity's rows on the operand (None: still the identity), bias per row

    def one(A):
        if A is None:
            return None, 0.0
        if A is IDENTITY:
            return (IDENTITY if J is None else J), bias
        if A.A is None:
            return (A if J is None else J[A.index]), bias[A.index]
        if J is None:
            return A, A.A @ bias[A.index]
        Jk = J[A.index]
        return (A.A @ Jk.reshape(Jk.shape[0], int(np.prod(Jk.shape[1:])))).reshape(-1, *Jk.shape[1:]), A.A @ bias[A.index]

    if isinstance(A_l, SharedColumns):
        (gl, lb), (gu, ub) = A_l.through(J, bias)
        return [(gl, gu) if isinstance(o, Perturbed) else None for o in ops], lb, ub
    (gl, lb), (gu, ub) = one(A_l), ((None, None) if A_u is A_l else one(A_u))
    if A_u is A_l:
        gu, ub = gl, lb
    return [(gl, gu) if isinstance(o, Perturbed) else None for o in ops], lb, ub


def _on_columns(pair, keep, same: bool):
    """Dense ``(lA, uA)`` kept on the elements ``keep`` (the others are zero); as
    :class:`SharedColumns` when both came from one array and ``keep`` has shared columns."""
    if same and keep.shared and pair[0] is not None and pair[1] is not None:
        lA, uA = (A.reshape(A.shape[0], -1) for A in pair)
        s = keep.shared
        shared = SharedColumns(keep.index, _take_columns(lA, keep, 0, s), _take_columns(lA, keep, s),
                               _take_columns(uA, keep, s))
        return shared, shared
    return tuple(None if A is None else OnElements(keep.index, _take_columns(A.reshape(A.shape[0], -1), keep))
                 for A in pair)


@dataclasses.dataclass(frozen=True, eq=False)
class Columns:
    """The columns a rule's pulled rows keep: ``order``, a permutation of a variable's flat
    elements with the ``k`` kept ones first, and its inverse (their gradients gather too:
    XLA's CPU scatter, a gather's plain transpose, ran slower than the matmuls it saved).
    The rule passes the first ``shared`` of them through unchanged (:class:`SharedColumns`)."""

    order: jax.Array
    inverse: jax.Array
    k: int
    shared: int = 0

    @property
    def index(self) -> jax.Array:
        return self.order[:self.k]


@jax.custom_vjp
def _gathered(A, index, inverse):
    return jnp.take(A, index, axis=1)


def _gathered_fwd(A, index, inverse):
    return jnp.take(A, index, axis=1), inverse


def _gathered_bwd(inverse, g):
    if g.shape[1] == 0:  # no column kept (a layer all inactive): jnp.take cannot read an empty axis
        return jnp.zeros((g.shape[0], inverse.shape[0]), g.dtype), None, None
    return jnp.take(g, inverse, axis=1, mode="fill", fill_value=0), None, None


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _take_columns(A, keep: Columns, start: int = 0, stop: int | None = None):
    """``A[:, keep.order[start:stop]]`` (``stop`` defaults to ``keep.k``), whose gradient
    gathers too, by the inverse permutation (columns not taken read as zero)."""
    stop = keep.k if stop is None else stop
    inverse = jnp.where(keep.inverse >= start, keep.inverse - start, A.shape[1])  # out of range: zero
    return _gathered(A, keep.order[start:stop], inverse)


def _dense(pair, aval):
    """Coefficients as arrays ``(rows, *aval.shape)`` (the same array twice for one
    identity or patches object: linear rules then pull it once)."""
    def one(A):
        if A is IDENTITY:
            return identity_rows(aval)
        return A.dense(aval) if isinstance(A, OnElements) else (A.dense(aval.shape) if isinstance(A, Patches) else A)

    if isinstance(pair[0], SharedColumns):
        return pair[0].side(False).dense(aval), pair[0].side(True).dense(aval)
    lA = one(pair[0])
    return (lA, lA) if pair[0] is pair[1] else (lA, one(pair[1]))


def _merge(old, new, aval):
    """The sum of two ``(lA, uA)`` contributions to one variable (dense where either is not)."""
    if old is None:
        return new
    (a_l, a_u), (b_l, b_u) = _dense(old, aval), _dense(new, aval)
    return _add(a_l, b_l), _add(a_u, b_u)


def pull_back(ctx: Context, target: int, lA, uA, bounds, stop=frozenset(), seeds=None, seen=None):
    """Push ``lA``/``uA`` (shape ``(rows, *target.shape)``, or both ``IDENTITY`` or one
    :class:`OnElements`) back to the inputs, or to the variables in ``stop``. Returns
    ``({var: (lA, uA)}, lower bias, upper bias)``; at the inputs, ``lA``/``uA`` may be
    :class:`Patches` (``Context.concretize`` takes them).

    Identity rows of a convolution's output travel as patches (``methods/patches.py``) as
    far as they can, and as dense arrays from the first rule that does not take them.
    ``seeds`` adds ``{var: (lA, uA)}`` terms on earlier variables to the function pulled
    back (beta-CROWN's split multipliers); ``seen``, a dict, receives the (dense)
    coefficients reaching each variable as its producer is passed (branching heuristics read them)."""
    pending = {target: (lA, uA)} | dict(seeds or {})
    lbias = ubias = 0.0
    for eqn in reversed(ctx.perturbed_eqns):
        out = eqn.outputs[0]
        if out not in pending or out in stop:
            continue
        A_l, A_u = pending.pop(out)
        same = A_l is A_u and not isinstance(A_l, SharedColumns)  # one array for both sides
        if seen is not None:
            seen[out] = _dense((A_l, A_u), ctx.graph.avals[out])
        ops = ctx.operands(eqn, bounds)
        step = None
        if isinstance(A_l, Patches) or isinstance(A_u, Patches):
            step = patches.pull(ctx, eqn, ops, A_l, A_u, target)
        elif A_l is IDENTITY:
            step = patches.start(ctx, eqn, ops) or _shortcut_step(ctx, eqn, ops, A_l, A_u)
        elif any(isinstance(a, (OnElements, SharedColumns)) for a in (A_l, A_u)):
            selected = same and isinstance(A_l, OnElements) and A_l.A is None  # some identity rows
            step = (selected and patches.start(ctx, eqn, ops, A_l.index)) or _shortcut_step(ctx, eqn, ops, A_l, A_u)
        if step is None:
            A_l, A_u = _dense((A_l, A_u), ctx.graph.avals[out])
            rule = ctx.rule(eqn)
            if ctx.slopes is not None and getattr(rule, "optimizable", False):
                alpha = ctx.slopes.get(ctx.position[eqn], target, rule, eqn, ops, (A_l if A_l is not None else A_u).shape[0])
                step = rule.backward(eqn, ops, A_l, A_u, alpha=alpha)
            else:
                step = rule.backward(eqn, ops, A_l, A_u)
        grads, lb, ub = step
        lbias, ubias = lbias + lb, ubias + ub
        keep = ctx.columns.get(eqn)
        for v, g in zip(eqn.inputs, grads):
            if g is not None:
                if keep is not None and all(a is None or isinstance(a, jax.Array) for a in g):
                    g = _on_columns(g, keep, same)
                pending[v] = _merge(pending.get(v), g, ctx.graph.avals[v])
    for v, pair in list(pending.items()):
        if v not in ctx.regions or any(a is IDENTITY or isinstance(a, (OnElements, SharedColumns)) for a in pair):
            pending[v] = _dense(pair, ctx.graph.avals[v])
    return pending, lbias, ubias


def concretize(ctx: Context, pending, lbias, ubias, lower=True, upper=True):
    """Bounds from linear functions of the inputs (``pending`` holds inputs only)."""
    lo = ctx.concretize({v: A[0] for v, A in pending.items()}, -1) + lbias if lower else None
    hi = ctx.concretize({v: A[1] for v, A in pending.items()}, +1) + ubias if upper else None
    return lo, hi


def backward(ctx: Context, target: int, lA, uA, bounds):
    """CROWN lower bounds of ``lA @ target`` and upper bounds of ``uA @ target`` (shape (rows,))."""
    pending, lbias, ubias = pull_back(ctx, target, lA, uA, bounds)
    return concretize(ctx, pending, lbias, ubias, lA is not None, uA is not None)



def identity_rows(aval) -> jax.Array:
    n = int(np.prod(aval.shape))
    return jnp.eye(n, dtype=aval.dtype).reshape(n, *aval.shape)


def interval_of(ctx: Context, v: int, bounds) -> Interval:
    """CROWN bounds of every element of ``v``."""
    aval = ctx.graph.avals[v]
    lo, hi = backward(ctx, v, IDENTITY, IDENTITY, bounds)
    return Interval(lo.reshape(aval.shape), hi.reshape(aval.shape))


def selected_interval(ctx: Context, v: int, bounds, index: jax.Array, reference: Interval) -> Interval:
    """CROWN bounds of the elements ``index`` (flat) of ``v``, ``reference``'s elsewhere."""
    if index.shape[0] == 0:
        return reference
    rows = OnElements(index)
    lo, hi = backward(ctx, v, rows, rows, bounds)
    put = lambda ref, new: ref.reshape(-1).at[index].set(new).reshape(ref.shape)  # noqa: E731
    return Interval(put(reference.lower, lo), put(reference.upper, hi))


def needed_intervals(ctx: Context, bounds, compute) -> dict[int, Interval]:
    """Fill ``bounds`` for the inputs of every rule that reads them, in order.

    A variable made by an elementwise rule from bounded inputs takes that rule's
    interval image (exact for the input box, and never looser than a linear
    bound through the same relaxation); others get ``compute(v, bounds)``, which
    may return None to stop there (the bounds found so far are returned).
    """
    producer = ctx.graph.producer()
    for eqn in ctx.perturbed_eqns:
        if not ctx.rule(eqn).needs_bounds:
            continue
        for v in eqn.inputs:
            if not ctx.graph.is_perturbed(v) or v in bounds:
                continue
            maker = producer.get(v)
            if maker is not None and getattr(ctx.rule(maker), "elementwise", False) and all(
                    u in bounds for u in maker.inputs if ctx.graph.is_perturbed(u)):
                bounds[v] = ctx.rule(maker).interval(maker, ctx.operands(maker, bounds))
            else:
                found = compute(v, bounds)
                if found is None:
                    return bounds
                bounds[v] = found
    return bounds


def crown_intervals(ctx: Context, reference: dict[int, Interval] | None = None,
                    combine=None, rows: dict[int, jax.Array] | None = None,
                    known: dict[int, Interval] | None = None, pause=frozenset()) -> dict[int, Interval]:
    """CROWN bounds on the inputs of every nonlinear rule, met with ``reference``
    (IBP's by default; alpha-CROWN passes its best bounds so far): where IBP is
    exact (the first linear layer on a box) the reference is taken as it is,
    elsewhere each element keeps the tighter of the two. (A linear bound can be
    looser than IBP, e.g. of ``2 + x * x``, whose McCormick plane dips below 2:
    met with IBP it stays in the domain of a following ``1 / .``.) ``combine(fresh,
    reference)`` replaces :func:`meet` (alpha-CROWN's changes only the gradient).
    ``rows`` (``{v: flat index}``) re-bounds only those elements of ``v``. ``known``
    bounds are taken as they are (an earlier stage's, ``methods/staged.py``); once any
    variable of ``pause`` is bounded, the next CROWN pass is not made: the bounds found
    so far are returned."""
    from jaxlirpa.methods.ibp import ibp_exact, ibp_intervals

    exact = ibp_exact(ctx)
    ref = ibp_intervals(ctx) if reference is None else reference
    combine, rows = combine or meet, rows or {}

    def compute(v, bounds):
        if v in exact:
            return ref[v]
        if any(p in bounds for p in pause):
            return None
        if v in rows:
            return combine(selected_interval(ctx, v, bounds, rows[v], ref[v]), ref[v])
        return combine(interval_of(ctx, v, bounds), ref[v])

    return needed_intervals(ctx, ctx.input_intervals() | dict(known or {}), compute)


def meet(a: Interval, b: Interval) -> Interval:
    """The elementwise intersection of two sound intervals (sound too)."""
    return Interval(jnp.maximum(a.lower, b.lower), jnp.minimum(a.upper, b.upper))
