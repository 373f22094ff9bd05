"""The rule interface and the one registry of rules, keyed by primitive.

A rule says how bounds pass through one primitive, for every method:

- ``interval``: IBP, elementwise ``[l, u]`` of the output from those of the inputs;
- ``backward``: CROWN, pull linear bounds ``A @ out`` back onto the inputs;
- ``forward``: forward-mode LiRPA, push linear functions of the perturbation.

Nonlinear elementwise primitives subclass :class:`ElementwiseRule` and supply a
relaxation only (two lines per element); the three passes over it are written
once, here. Linear primitives need no code at all (see ``rules/linear.py``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlirpa._compat import Primitive


class Interval(NamedTuple):
    lower: jax.Array
    upper: jax.Array


class LinearBounds(NamedTuple):
    """``lw @ e + lb <= v <= uw @ e + ub`` for every e in the input set.

    ``lw``/``uw`` have shape ``(n_inputs, *v.shape)``; e is the flattened input.
    """

    lw: jax.Array
    lb: jax.Array
    uw: jax.Array
    ub: jax.Array


class Perturbed(NamedTuple):
    """A perturbed operand as a rule sees it: its interval and, in forward
    mode, its linear bounds. Constant operands are passed as plain arrays."""

    interval: Interval | None = None
    linear: LinearBounds | None = None


class Relaxation(NamedTuple):
    """Elementwise ``lw * x + lb <= f(x) <= uw * x + ub`` on ``[l, u]``."""

    lw: jax.Array
    lb: jax.Array
    uw: jax.Array
    ub: jax.Array


class UnsupportedPrimitiveError(NotImplementedError):
    """No rule bounds this primitive (or this use of it)."""


class Rule:
    """Base of all rules. ``needs_bounds``: the rule reads input intervals."""

    needs_bounds = True

    def accepts(self, eqn, perturbed: tuple[bool, ...]) -> bool:
        """Whether the rule handles this equation given which operands are perturbed."""
        return True

    def resolve(self, eqn, perturbed: tuple[bool, ...]) -> "Rule":
        """The rule that bounds this equation: ``self``, or, for a rule that
        dispatches between several (``mul`` by a constant is linear, a product
        of two perturbed tensors is not), the one chosen for it."""
        return self

    def why_not(self, eqn, perturbed: tuple[bool, ...]) -> str:
        """Why ``accepts`` said no, for the error message."""
        return "its rule does not handle this combination of perturbed operands"

    def interval(self, eqn, ops) -> Interval:
        raise NotImplementedError

    def backward(self, eqn, ops, lA, uA, alpha=None):
        """Returns ``(per-operand (lA, uA) or None, lower bias, upper bias)``; biases have shape (rows,)."""
        raise NotImplementedError

    def forward(self, eqn, ops) -> LinearBounds:
        raise NotImplementedError


def fold_min(stacked) -> jax.Array:
    """The minimum over the leading axis (of an array or a list), by elementwise ``minimum``:
    its gradient selects an operand, where ``jnp.min``'s divides by how many entries equal
    the result, 0 / 0 (a NaN gradient) once XLA recomputes an entry in another fusion with
    other rounding than the result had (seen in jitted sin/cos relaxations)."""
    return functools.reduce(jnp.minimum, list(stacked))


def fold_max(stacked) -> jax.Array:
    """The maximum over the leading axis, as :func:`fold_min`."""
    return functools.reduce(jnp.maximum, list(stacked))


def float_pair(l, u):
    """``l`` and ``u`` as arrays of one floating dtype, broadcast together."""
    l, u = jnp.asarray(l), jnp.asarray(u)
    dtype = jnp.result_type(l, u)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.broadcast_arrays(l.astype(dtype), u.astype(dtype))


def _mul(a, b):
    """``a * b`` with ``0 * inf = 0``: an infinite offset (an out-of-domain or
    overflowing element) must not touch the bounds where its coefficient is 0."""
    return a * jnp.where(a == 0, 0, b)  # the zero sits inside: gradients stay finite too


def _pos_neg(A):
    return jnp.maximum(A, 0), jnp.minimum(A, 0)


def _rowsum(t):
    return jnp.sum(t, axis=tuple(range(1, t.ndim)))


def through_lines(A, r: Relaxation, upper: bool):
    """Coefficients ``A`` of a lower (or upper) bound pulled through the lines ``r``
    (broadcast against ``A``): the new coefficients and the bias terms, elementwise
    (the caller sums them over each row's elements). Each entry picks its line by its
    sign; a zero entry gives 0 even against an infinite intercept, gradients included.
    (Selects, products inside: XLA:CPU runs ``max(A, 0) * b + min(A, 0) * c`` with the
    zero guards several times slower, and the row sums of ``A * select(...)`` as a
    YNNPACK reduction that first writes out both factors, at twice the time.)"""
    def side(on_positive, on_negative):
        positive, negative = A > 0, A < 0
        return jnp.where(positive, A * jnp.where(positive, on_positive, 0), A * jnp.where(negative, on_negative, 0))

    if upper:
        return side(r.uw, r.lw), side(r.ub, r.lb)
    return side(r.lw, r.uw), side(r.lb, r.ub)


class ElementwiseRule(Rule):
    """A primitive ``y = f(x, *params)`` elementwise in its one perturbed operand ``x``.

    Subclasses define ``image(l, u, *params) -> (lo, hi)`` and
    ``relax(l, u, *params) -> Relaxation``; ``params`` are the constant operands
    in order. ``x`` is found by position: the only perturbed operand.
    """

    elementwise = True

    def accepts(self, eqn, perturbed):
        return sum(perturbed) == 1

    def split(self, eqn, ops):
        x = next(o for o in ops if isinstance(o, Perturbed))
        params = [o for o in ops if not isinstance(o, Perturbed)]
        return x, params

    def _relaxation(self, eqn, ops) -> Relaxation:
        x, params = self.split(eqn, ops)
        shape = eqn_shape(eqn)
        r = self.relax(*x.interval, *params)
        return Relaxation(*(jnp.broadcast_to(t, shape) for t in r))

    def interval(self, eqn, ops):
        x, params = self.split(eqn, ops)
        lo, hi = self.image(*x.interval, *params)
        shape = eqn_shape(eqn)
        return Interval(jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape))

    def backward(self, eqn, ops, lA, uA, alpha=None):
        """``alpha``: optional ``(lower-pass, upper-pass)`` parameters of the
        optimisable lines, each ``(rows, *alpha shape)`` (alpha-CROWN)."""
        lines = lambda a: self._relaxation(eqn, ops) if a is None else self._optimised(eqn, ops, a)
        lbias = ubias = 0.0
        if lA is not None:
            lA, terms = through_lines(lA, lines(None if alpha is None else alpha[0]), upper=False)
            lbias = _rowsum(terms)
        if uA is not None:
            uA, terms = through_lines(uA, lines(None if alpha is None else alpha[1]), upper=True)
            ubias = _rowsum(terms)
        grads = [(lA, uA) if isinstance(o, Perturbed) else None for o in ops]
        return grads, lbias, ubias

    # alpha-CROWN: a rule is optimisable when it defines either
    # - ``slope_range(l, u, *params)`` and ``lower_line(l, u, *params, slope)``: the lower
    #   line's slope is the free parameter (ReLU and kin), shaped like the output; or
    # - ``alpha_init(l, u, *params) -> (init, lo, hi)`` and ``relax_at(l, u, *params, alpha)``:
    #   ``k`` free parameters per element stacked on a leading axis (S-shaped and convex
    #   functions: where their tangent lines touch), CROWN's own ones and their valid
    #   range; ``relax_at`` projects ``alpha`` (shape ``(k, rows, *shape)``) onto that
    #   range of the current ``[l, u]`` and gives the two lines, sound for any alpha.
    @property
    def optimizable(self) -> bool:
        return hasattr(self, "lower_line") or hasattr(self, "relax_at")

    def alpha_start(self, eqn, ops):
        """CROWN's own alpha (the initial point) and its valid range, each shaped like
        the output (with the leading parameter axis of ``relax_at`` rules)."""
        x, params = self.split(eqn, ops)
        shape = eqn_shape(eqn)
        if hasattr(self, "relax_at"):
            init, lo, hi = self.alpha_init(*x.interval, *params)
            shape = (init.shape[0], *shape)
        else:
            lo, hi = self.slope_range(*x.interval, *params)
            init = self._relaxation(eqn, ops).lw
        return tuple(jnp.broadcast_to(t, shape) for t in (init, lo, hi))

    def _optimised(self, eqn, ops, alpha):
        """The relaxation at ``alpha`` (shape ``(rows, *alpha shape)``), shaped ``(rows, *output shape)``."""
        x, params = self.split(eqn, ops)
        full = (alpha.shape[0], *eqn_shape(eqn))
        if hasattr(self, "relax_at"):
            r = self.relax_at(*x.interval, *params, alpha=jnp.moveaxis(alpha, 1, 0))
        else:
            lw, lb = self.lower_line(*x.interval, *params, slope=alpha)
            fixed = self._relaxation(eqn, ops)
            r = Relaxation(lw, lb, fixed.uw, fixed.ub)
        return Relaxation(*(jnp.broadcast_to(t, full) for t in r))

    # Branch and bound: a piecewise-linear rule that defines ``kink(*params)`` is linear
    # on each side of it, so splitting its input there removes the relaxation.
    @property
    def splittable(self) -> bool:
        return hasattr(self, "kink")

    def breakpoint(self, eqn, ops):
        """Where a split cuts this rule's input, shaped like it (beta-CROWN)."""
        _, params = self.split(eqn, ops)
        return jnp.broadcast_to(jnp.asarray(self.kink(*params), eqn.out_avals[0].dtype), eqn_shape(eqn))

    def forward(self, eqn, ops):
        x, _ = self.split(eqn, ops)
        r = self._relaxation(eqn, ops)
        lw, lb, uw, ub = x.linear
        lpos, lneg = _pos_neg(r.lw)
        upos, uneg = _pos_neg(r.uw)
        return LinearBounds(
            lw=lpos * lw + lneg * uw,
            lb=_mul(lpos, lb) + _mul(lneg, ub) + r.lb,
            uw=upos * uw + uneg * lw,
            ub=_mul(upos, ub) + _mul(uneg, lb) + r.ub,
        )

    def image(self, l, u, *params):
        raise NotImplementedError

    def relax(self, l, u, *params) -> Relaxation:
        raise NotImplementedError


def eqn_shape(eqn):
    return eqn.out_avals[0].shape


class Alternatives(Rule):
    """Several rules for one primitive: the first that accepts an equation bounds
    it (``mul`` by a constant is linear, a product of two perturbed tensors is not)."""

    def __init__(self, *rules: Rule):
        self.rules = rules

    def resolve(self, eqn, perturbed):
        return next((r for r in self.rules if r.accepts(eqn, perturbed)), self.rules[0])

    def accepts(self, eqn, perturbed):
        return any(r.accepts(eqn, perturbed) for r in self.rules)

    def why_not(self, eqn, perturbed):
        return self.rules[0].why_not(eqn, perturbed)


RULES: dict[Primitive, Rule] = {}


def register(rule: Rule, *prims: Primitive) -> Rule:
    """Register ``rule`` for each primitive in ``prims`` (one line per family)."""
    for p in prims:
        RULES[p] = rule
    return rule


def register_alternative(rule: Rule, *prims: Primitive) -> Rule:
    """Add ``rule`` for the equations of ``prims`` that the rules already registered refuse."""
    for p in prims:
        current = RULES.get(p)
        earlier = current.rules if isinstance(current, Alternatives) else (() if current is None else (current,))
        RULES[p] = Alternatives(*earlier, rule)
    return rule


def lookup(eqn, perturbed: tuple[bool, ...]) -> Rule:
    """The rule for ``eqn``, or an :class:`UnsupportedPrimitiveError` that names
    the primitive, its operand shapes and the user's line."""
    rule = RULES.get(eqn.prim)
    if rule is not None:
        rule = rule.resolve(eqn, perturbed) or rule
        if rule.accepts(eqn, perturbed):
            return rule
    why = "no rule is registered for it" if rule is None else rule.why_not(eqn, perturbed)
    raise unsupported(eqn.prim.name, eqn.in_avals, perturbed, eqn.location(),
                      f"{why}. Register one with jaxlirpa.register_rule(primitive, rule) (an ElementwiseRule "
                      f"subclass for elementwise nonlinear functions, jaxlirpa.LINEAR for linear ones); "
                      f"see README 'Adding a rule'")


def unsupported(name: str, avals, perturbed, location: str, why: str) -> UnsupportedPrimitiveError:
    """The one error for anything jaxlirpa cannot bound: the primitive, its operand
    shapes (perturbed ones marked), the user's line, why, and what to do."""
    shapes = ", ".join(f"{'perturbed ' if p else ''}{tuple(a.shape)}" for a, p in zip(avals, perturbed))
    return UnsupportedPrimitiveError(f"jaxlirpa cannot bound primitive '{name}' (operands: {shapes}) at {location}: {why}.")

