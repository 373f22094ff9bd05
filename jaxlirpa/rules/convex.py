"""Functions convex or concave on each piece of their domain: ``exp``, ``exp2``,
``expm1``, ``log``, ``log1p``, ``sqrt``, ``rsqrt``, ``square``, ``integer_pow``
(any integer power), ``pow`` with a constant exponent (or a constant positive
base), and ``c / x`` (:class:`DivByPerturbed`, an alternative to the linear
rule of ``div``, which keeps ``x / c``).

Relaxations are auto_LiRPA's: on a convex piece the upper line is the chord
and the lower line the tangent at the midpoint ``m = (l + u) / 2``
(``exp``: at ``min(m, l + 0.99)``, as ``BoundExp``); on a concave piece the
roles swap (``BoundLog``, ``BoundSqrt``: chord below, tangent at ``m`` above).
``x ** y`` for odd ``y >= 3`` on an interval around 0 (concave then convex) is
``-(S-shaped)``: it takes :func:`jaxlirpa.rules.sshape.s_shaped_relaxation` of
``-x ** y``. Even powers use the tangent at ``m`` below also when the interval
holds 0 (auto_LiRPA's ``BoundPow`` uses the line ``0`` there; neither line is
uniformly tighter, the tangent has the smaller area).

Domains. ``log``/``rsqrt`` need ``l > 0``, ``log1p`` ``l > -1``, ``sqrt``
``l >= 0``, negative powers and ``c / x`` an interval without 0, fractional
powers ``l >= 0`` (``l > 0`` if negative). With concrete bounds (a rule called
eagerly) an interval outside raises ``ValueError`` naming the operation and
the first offending bounds. Under tracing (``jaxlirpa.bound`` is jitted) the
bounds cannot be inspected, and clamping ``l`` into the domain would be
unsound (the function is ``-inf`` or NaN there), so those elements get the
uninformative image ``[-inf, +inf]`` and the relaxation ``0 * x -+ inf``:
sound, and impossible to mistake for a proof. These rules' CROWN and forward
passes (:class:`ElementwiseRule`) keep such an element from touching the bounds
that do not depend on it; those that do become infinite (or NaN where a later
rule multiplies them by 0), never finite and wrong. Likewise, where ``f``
overflows at a bound (``exp`` of 89 in float32) or a bound is infinite, the
relaxation is the constant pair of lines at the image. Everything is computed
on inputs moved into the domain first, so values and gradients are NaN-free.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import ElementwiseRule, Perturbed, Relaxation, float_pair, register, register_alternative
from jaxlirpa.rules.sshape import s_shaped_relaxation, s_shaped_tangent_points


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_domain(op: str, domain: str, l, u, bad) -> None:
    """Raise ``ValueError`` if the concrete mask ``bad`` flags any element; no-op under tracing."""
    if not _concrete(l, u, bad):
        return
    bad = np.asarray(bad)
    if not bad.any():
        return
    l, u = np.broadcast_to(np.asarray(l), bad.shape), np.broadcast_to(np.asarray(u), bad.shape)
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{op}: input bounds [{float(l[idx]):.9g}, {float(u[idx]):.9g}] (element {idx}) leave the domain {domain}; "
        f"{int(bad.sum())} of {bad.size} elements do. The function is infinite or undefined there, "
        f"so no finite bound exists: tighten the input set or the bounds feeding this {op}."
    )


def _unbounded(bad, r: Relaxation) -> Relaxation:
    inf = jnp.asarray(jnp.inf, r.lb.dtype)
    return Relaxation(jnp.where(bad, 0, r.lw), jnp.where(bad, -inf, r.lb),
                      jnp.where(bad, 0, r.uw), jnp.where(bad, inf, r.ub))


def _unbounded_image(bad, lo, hi):
    inf = jnp.asarray(jnp.inf, lo.dtype)
    return jnp.where(bad, -inf, lo), jnp.where(bad, inf, hi)


def _chord(l, u, fl, fu, df_l):
    """Slope and intercept of the chord; the tangent at ``l`` where ``l == u``."""
    wide = u > l
    k = jnp.where(wide, (fu - fl) / jnp.where(wide, u - l, 1.0), df_l)
    return k, fl - k * l


def _tangent(x, fx, dfx):
    return dfx, fx - dfx * x


def convex_relaxation(l, u, fl, fu, df_l, m, fm, df_m) -> Relaxation:
    """Convex ``f``: tangent at ``m`` below, chord above."""
    (kc, bc), (kt, bt) = _chord(l, u, fl, fu, df_l), _tangent(m, fm, df_m)
    return Relaxation(kt, bt, kc, bc)


def concave_relaxation(l, u, fl, fu, df_l, m, fm, df_m) -> Relaxation:
    """Concave ``f``: chord below, tangent at ``m`` above."""
    (kc, bc), (kt, bt) = _chord(l, u, fl, fu, df_l), _tangent(m, fm, df_m)
    return Relaxation(kc, bc, kt, bt)


def _one_tangent(m, lo, hi, below):
    """alpha-CROWN's parameters of a relaxation with one tangent line, the lower one where
    ``below`` (convex), else the upper one: ``(init, lo, hi)``, each ``(2, *shape)``, the
    tangent points of the lower and the upper line. The tangent's point starts at ``m`` and
    is free in ``[lo, hi]``; the chord's is unused, pinned at ``m``."""
    below = jnp.broadcast_to(below, jnp.shape(m))
    init = jnp.stack([m, m])
    free = jnp.stack([below, ~below])
    return init, jnp.where(free, lo, init), jnp.where(free, hi, init)


def _tangent_at(points, below, lo, hi):
    """The point of the tangent line (the lower one where ``below``) among alpha-CROWN's
    ``points`` (shape ``(2, ..., *shape)``), projected onto ``[lo, hi]``."""
    return jnp.clip(jnp.where(below, points[0], points[1]), lo, hi)


def _select(mask, a: Relaxation, b: Relaxation) -> Relaxation:
    return Relaxation(*(jnp.where(mask, x, y) for x, y in zip(a, b)))


def _finite_image(l, u, bad, safe, image):
    """``image`` on domain-safe inputs, and where it (or a bound) is not finite, which elements
    the values come from: gradients flow through the finite elements only (``0 * inf``
    cotangents would be NaN)."""
    lo0, hi0 = (lax.stop_gradient(t) for t in image(jnp.where(bad, safe, l), jnp.where(bad, safe, u)))
    flat = ~bad & ~(jnp.isfinite(l) & jnp.isfinite(u) & jnp.isfinite(lo0) & jnp.isfinite(hi0))
    move = bad | flat
    lo, hi = image(jnp.where(move, safe, l), jnp.where(move, safe, u))
    return jnp.where(flat, lo0, lo), jnp.where(flat, hi0, hi), flat, move


def _in_domain(l, u, bad, safe, image):
    """``l`` and ``u`` moved to ``safe`` where :func:`_guarded` does not use the relaxation."""
    _, _, _, move = _finite_image(l, u, bad, safe, image)
    return jnp.where(move, safe, l), jnp.where(move, safe, u)


def _image_of(l, u, bad, safe, image):
    lo, hi, _, _ = _finite_image(l, u, bad, safe, image)
    return _unbounded_image(bad, lo, hi)


def _guarded(l, u, bad, safe, image, relax) -> Relaxation:
    """``relax`` where the bounds are in the domain and the image is finite; constant
    lines at the image where a bound or the image is infinite (``exp`` overflowing,
    ``log`` of an unbounded interval); ``0 * x -+ inf`` where out of the domain.
    ``image`` and ``relax`` see only domain-safe (and, for ``relax``, finite) inputs."""
    lo, hi, flat, move = _finite_image(l, u, bad, safe, image)
    r = relax(jnp.where(move, safe, l), jnp.where(move, safe, u))
    zero = jnp.zeros_like(lo)
    return _unbounded(bad, _select(flat, Relaxation(zero, jnp.where(bad, 0, lo), zero, jnp.where(bad, 0, hi)), r))


class _Monotone(ElementwiseRule):
    """A monotone function, convex or concave on its domain (``bad(l, u)`` flags
    intervals leaving it; ``safe`` is a point inside)."""

    name = ""
    domain = ""
    convex = True
    safe = 1.0

    def f(self, x):
        raise NotImplementedError

    def df(self, x):
        raise NotImplementedError

    def bad(self, l, u):
        return jnp.zeros(jnp.broadcast_shapes(jnp.shape(l), jnp.shape(u)), bool)

    def tangent_point(self, l, u):
        return (l + u) / 2

    def lowest_point(self, l, u):
        """The lowest tangent point alpha-CROWN may take."""
        return l

    def _prepare(self, l, u):
        l, u = float_pair(l, u)
        bad = self.bad(l, u)
        check_domain(self.name, self.domain, l, u, bad)
        return l, u, bad

    def _image(self, l, u):
        fl, fu = self.f(l), self.f(u)
        return jnp.minimum(fl, fu), jnp.maximum(fl, fu)

    def _relax(self, l, u, points=None):
        m = (self.tangent_point(l, u) if points is None
             else _tangent_at(points, self.convex, self.lowest_point(l, u), u))
        build = convex_relaxation if self.convex else concave_relaxation
        return build(l, u, self.f(l), self.f(u), self.df(l), m, self.f(m), self.df(m))

    def image(self, l, u):
        l, u, bad = self._prepare(l, u)
        return _image_of(l, u, bad, self.safe, self._image)

    def relax(self, l, u):
        return self.relax_at(l, u, None)

    def alpha_init(self, l, u):
        l, u, bad = self._prepare(l, u)
        l, u = _in_domain(l, u, bad, self.safe, self._image)
        return _one_tangent(self.tangent_point(l, u), self.lowest_point(l, u), u, self.convex)

    def relax_at(self, l, u, alpha):
        l, u, bad = self._prepare(l, u)
        return _guarded(l, u, bad, self.safe, self._image, lambda l, u: self._relax(l, u, alpha))


class Exp(_Monotone):
    """``exp``: tangent at ``min(m, l + 0.99)`` below (auto_LiRPA's choice), chord above."""

    name = "exp"
    shift = 0.99

    def f(self, x):
        return jnp.exp(x)

    df = f

    def tangent_point(self, l, u):
        return jnp.minimum((l + u) / 2, l + self.shift)


class Exp2(Exp):
    name = "exp2"
    shift = 0.99 / math.log(2)

    def f(self, x):
        return jnp.exp2(x)

    def df(self, x):
        return math.log(2) * jnp.exp2(x)


class Expm1(Exp):
    name = "expm1"

    def f(self, x):
        return jnp.expm1(x)

    def df(self, x):
        return jnp.exp(x)


class Log(_Monotone):
    name, domain, convex = "log", "x > 0", False

    def f(self, x):
        return jnp.log(x)

    def df(self, x):
        return 1 / x

    def bad(self, l, u):
        return l <= 0


class Log1p(_Monotone):
    name, domain, convex = "log1p", "x > -1", False

    def f(self, x):
        return jnp.log1p(x)

    def df(self, x):
        return 1 / (1 + x)

    def bad(self, l, u):
        return l <= -1


def _sqrt0(x):
    """``sqrt`` with a zero (not infinite) gradient at 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


class Sqrt(_Monotone):
    name, domain, convex = "sqrt", "x >= 0", False

    def f(self, x):
        return _sqrt0(x)

    def df(self, x):  # only used at m > 0, or at l == u == 0 where the slope is irrelevant
        pos = x > 0
        return jnp.where(pos, 0.5 / jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)

    def bad(self, l, u):
        return l < 0

    def lowest_point(self, l, u):  # the tangent at 0 is vertical
        return jnp.where(l > 0, l, u / 100)


class Rsqrt(_Monotone):
    name, domain, convex = "rsqrt", "x > 0", True

    def f(self, x):
        return lax.rsqrt(x)

    def df(self, x):
        return -0.5 * lax.rsqrt(x) / x

    def bad(self, l, u):
        return l <= 0


# ---------------------------------------------------------------------------------------------
# powers


def _pow(x, c):
    """``x ** c`` for a constant ``c``; NaN-free gradients at ``x == 0``."""
    if _concrete(c) and np.ndim(c) == 0 and float(c) == round(float(c)) and abs(float(c)) < 2**31:
        c = int(c)
        if c >= 0:
            return lax.integer_pow(x, c) if c else jnp.ones_like(x)
        zero = x == 0
        return jnp.where(zero, jnp.inf, lax.integer_pow(jnp.where(zero, 1.0, x), c))
    c = jnp.asarray(c, x.dtype)
    zero = x == 0
    at_zero = jnp.where(c > 0, 0.0, jnp.where(c == 0, 1.0, jnp.inf))
    return jnp.where(zero, at_zero, jnp.power(jnp.where(zero, 1.0, x), c))


def _dpow(x, c):
    """``c * x ** (c - 1)``: at ``x == 0`` 0 if ``c == 0`` and ``inf`` if ``c < 1``; NaN-free gradients."""
    if _concrete(c) and np.ndim(c) == 0 and float(c) == 0:
        return jnp.zeros_like(x)
    ca = jnp.asarray(c, x.dtype)
    sing = (x == 0) & (ca < 1)
    val = ca * _pow(jnp.where(sing, 1.0, x), c - 1)
    return jnp.where(sing, jnp.where(ca == 0, 0.0, jnp.inf), val)


def _power_kinds(c):
    """Flags of the exponent (numpy when concrete, else jnp): integer, even, odd."""
    mod = np if _concrete(c) else jnp
    c = mod.asarray(c)
    is_int = c == mod.round(c)
    even = is_int & (mod.mod(c, 2) == 0)
    return c, is_int, even, is_int & ~even


def _pow_domain(c) -> str:
    if _concrete(c) and np.ndim(c) == 0:
        c = float(c)
        if c == round(c):
            return f"of x ** {int(c)}: x != 0" if c < 0 else "of all reals"
        return f"of x ** {c}: " + ("x > 0" if c < 0 else "x >= 0")
    return "of x ** c: x != 0 for c < 0, x >= 0 for fractional c"


def power_domain_bad(l, u, c):
    _, is_int, _, _ = _power_kinds(c)
    return (~is_int & (l < 0)) | ((c < 0) & (l <= 0) & (u >= 0))


def _power_image(l, u, c):
    c, _, even, _ = _power_kinds(c)
    fl, fu = _pow(l, c), _pow(u, c)
    lo, hi = jnp.minimum(fl, fu), jnp.maximum(fl, fu)
    return jnp.where(even & (c > 0) & (l < 0) & (u > 0), 0.0, lo), hi


def _power_pieces(l, u, c):
    """Per element: concave (tangent above), ``[0, 0]`` of a ``0 < c < 1`` power (whose
    tangent at 0 is vertical; f == 0 there), around 0 for odd ``c >= 3`` (-(S-shaped)),
    CROWN's tangent point and the lowest one alpha-CROWN may take."""
    c, _, _, odd = _power_kinds(c)
    pos, neg = l >= 0, u <= 0
    root = pos & (c > 0) & (c < 1)
    concave = root | (neg & odd)
    point0 = root & (u == 0)
    s_shaped = ~pos & ~neg & odd & (c >= 3)
    lowest = jnp.where(root & (l == 0), u / 100, l)
    return c, concave, point0, s_shaped, jnp.where(point0, 1.0, (l + u) / 2), lowest


def _has_odd_power(c) -> bool:
    """Whether some element may take the negated S-shape (odd ``c >= 3``; unknown if traced)."""
    c, _, _, odd = _power_kinds(c)
    return not _concrete(c) or bool(np.any(odd & (c >= 3)))


def _negated_power(c, dtype):
    """``-x ** c`` and its derivative: S-shaped for odd ``c >= 3``."""
    cc = jnp.asarray(c, dtype)
    return (lambda x: -_pow(x, cc)), (lambda x: -_dpow(x, cc))


def _power_relax(l, u, c, points=None) -> Relaxation:
    c, concave, point0, s_shaped, m, lowest = _power_pieces(l, u, c)
    if points is not None:
        m = jnp.where(point0, 1.0, _tangent_at(points, ~concave, lowest, u))
    df_l = jnp.where(point0, 0.0, _dpow(l, c))
    args = (l, u, _pow(l, c), _pow(u, c), df_l, m, _pow(m, c), _dpow(m, c))
    r = _select(concave, concave_relaxation(*args), convex_relaxation(*args))
    r = _select(point0, Relaxation(*(jnp.zeros_like(l),) * 4), r)
    if _has_odd_power(c):
        s = s_shaped_relaxation(*_negated_power(c, l.dtype), l, u, points=None if points is None else points[::-1])
        r = _select(s_shaped, Relaxation(-s.uw, -s.ub, -s.lw, -s.lb), r)
    return r


def _power_alpha(l, u, c):
    c, concave, point0, s_shaped, m, lowest = _power_pieces(l, u, c)
    init, lo, hi = _one_tangent(m, lowest, u, ~concave)
    lo, hi = jnp.where(point0, init, lo), jnp.where(point0, init, hi)
    if _has_odd_power(c):  # the negated S-shape's lower line is our upper one
        flipped = [t[::-1] for t in s_shaped_tangent_points(*_negated_power(c, l.dtype), l, u)]
        init, lo, hi = (jnp.where(s_shaped, a, b) for a, b in zip(flipped, (init, lo, hi)))
    return init, lo, hi


def power_image(l, u, c, op="pow"):
    """Exact range of ``x ** c`` on ``[l, u]`` (constant ``c``)."""
    l, u = float_pair(l, u)
    bad = power_domain_bad(l, u, c)
    check_domain(op, _pow_domain(c), l, u, bad)
    return _image_of(l, u, bad, 1.0, lambda l, u: _power_image(l, u, c))


def power_relaxation(l, u, c, op="pow", points=None) -> Relaxation:
    """Relaxation of ``x ** c`` on ``[l, u]`` (constant ``c``, scalar or elementwise).

    Convex pieces (``l >= 0`` and ``c`` outside ``(0, 1)``; even ``c``
    anywhere) take the convex relaxation, concave pieces (``l >= 0``,
    ``0 < c < 1``; ``u <= 0``, odd ``c``) the concave one, odd ``c >= 3``
    around 0 the negated S-shaped one. ``points``: alpha-CROWN's tangent points
    (:func:`power_alpha_init`), CROWN's own when None.
    """
    l, u = float_pair(l, u)
    bad = power_domain_bad(l, u, c)
    check_domain(op, _pow_domain(c), l, u, bad)
    return _guarded(l, u, bad, 1.0, lambda l, u: _power_image(l, u, c), lambda l, u: _power_relax(l, u, c, points))


def power_alpha_init(l, u, c, op="pow"):
    """alpha-CROWN's start and range for :func:`power_relaxation`'s ``points``: the tangent
    point of the lower and of the upper line, each ``(2, *shape)`` (see ``_one_tangent``)."""
    l, u = float_pair(l, u)
    bad = power_domain_bad(l, u, c)
    check_domain(op, _pow_domain(c), l, u, bad)
    return _power_alpha(*_in_domain(l, u, bad, 1.0, lambda l, u: _power_image(l, u, c)), c)


class IntegerPow(ElementwiseRule):
    """``integer_pow`` (``x ** y`` for a Python int ``y``, read from the equation's params)."""

    def split(self, eqn, ops):
        x, consts = super().split(eqn, ops)
        return x, [*consts, eqn.params["y"]]

    def image(self, l, u, y):
        return power_image(l, u, y, op=f"integer_pow (y={y})")

    def relax(self, l, u, y):
        return self.relax_at(l, u, y, alpha=None)

    def alpha_init(self, l, u, y):
        return power_alpha_init(l, u, y, op=f"integer_pow (y={y})")

    def relax_at(self, l, u, y, alpha):
        return power_relaxation(l, u, y, op=f"integer_pow (y={y})", points=alpha)


class Square(IntegerPow):
    """``square``: ``x ** 2``."""

    def split(self, eqn, ops):
        x, consts = ElementwiseRule.split(self, eqn, ops)
        return x, [*consts, 2]


class Pow(ElementwiseRule):
    """``pow(x, c)`` with a constant exponent ``c`` (see :func:`power_relaxation`), or
    ``pow(c, x)`` with a constant base ``c > 0``: ``exp(x log c)``, convex."""

    def split(self, eqn, ops):
        if isinstance(ops[0], Perturbed):
            return ops[0], [ops[1], 0]
        return ops[1], [ops[0], 1]

    def _base(self, l, u, c):
        l, u = float_pair(l, u)
        c = jnp.asarray(c, l.dtype)
        bad = (c <= 0) & jnp.ones_like(l, bool)
        domain = f"of c ** x with base c = {float(c) if c.ndim == 0 and _concrete(c) else 'c'}: needs c > 0"
        check_domain("pow", domain, l, u, bad)
        log_c = jnp.log(jnp.where(bad, 1.0, c))
        f = lambda x: jnp.exp(x * log_c)
        image = lambda l, u: (jnp.minimum(f(l), f(u)), jnp.maximum(f(l), f(u)))
        return l, u, bad, log_c, f, image

    def image(self, l, u, c, which):
        if which == 0:
            return power_image(l, u, c)
        l, u, bad, _, _, image = self._base(l, u, c)
        return _image_of(l, u, bad, 0.0, image)

    def relax(self, l, u, c, which):
        return self.relax_at(l, u, c, which, alpha=None)

    def alpha_init(self, l, u, c, which):
        if which == 0:
            return power_alpha_init(l, u, c)
        l, u, bad, _, _, image = self._base(l, u, c)
        l, u = _in_domain(l, u, bad, 0.0, image)
        return _one_tangent((l + u) / 2, l, u, True)

    def relax_at(self, l, u, c, which, alpha):
        if which == 0:
            return power_relaxation(l, u, c, points=alpha)
        l, u, bad, log_c, f, image = self._base(l, u, c)

        def relax(l, u):
            m = (l + u) / 2 if alpha is None else _tangent_at(alpha, True, l, u)
            return convex_relaxation(l, u, f(l), f(u), log_c * f(l), m, f(m), log_c * f(m))

        return _guarded(l, u, bad, 0.0, image, relax)


class DivByPerturbed(ElementwiseRule):
    """``c / x`` with a constant numerator ``c`` and a perturbed denominator whose
    interval excludes 0: ``c`` times auto_LiRPA's ``BoundReciprocal``
    relaxation (``1/x`` is convex for x > 0, concave for x < 0)."""

    op = "div (c / x)"

    def accepts(self, eqn, perturbed):
        return tuple(perturbed) == (False, True)

    def image(self, l, u, c):
        lo, hi = power_image(l, u, -1, op=self.op)
        bad = power_domain_bad(*float_pair(l, u), -1)
        c = jnp.asarray(c, lo.dtype)
        a, b = c * lo, c * hi
        return _unbounded_image(bad, jnp.minimum(a, b), jnp.maximum(a, b))

    def relax(self, l, u, c):
        return self.relax_at(l, u, c, alpha=None)

    def alpha_init(self, l, u, c):
        init, lo, hi = power_alpha_init(l, u, -1, op=self.op)
        return tuple(jnp.where(jnp.asarray(c) >= 0, t, t[::-1]) for t in (init, lo, hi))

    def relax_at(self, l, u, c, alpha):
        """For ``c < 0`` the lines of ``1 / x`` swap sides: so do their tangent points."""
        points = None if alpha is None else jnp.where(jnp.asarray(c) >= 0, alpha, alpha[::-1])
        r = power_relaxation(l, u, -1, op=self.op, points=points)
        bad = power_domain_bad(*float_pair(l, u), -1)
        c = jnp.asarray(c, r.lw.dtype)
        scaled = Relaxation(*(c * t for t in r))
        flipped = Relaxation(scaled.uw, scaled.ub, scaled.lw, scaled.lb)
        return _unbounded(bad, _select(c >= 0, scaled, flipped))


DIV_BY_PERTURBED = register_alternative(DivByPerturbed(), P.div_p)

register(Exp(), P.exp_p)
register(Exp2(), P.exp2_p)
register(Expm1(), P.expm1_p)
register(Log(), P.log_p)
register(Log1p(), P.log1p_p)
register(Sqrt(), P.sqrt_p)
register(Rsqrt(), P.rsqrt_p)
register(IntegerPow(), P.integer_pow_p)
register(Square(), P.square_p)
register(Pow(), P.pow_p)
