"""S-shaped activations: ``tanh``, ``logistic`` (sigmoid) and ``erf``.

Each is increasing, convex for x < 0, concave for x > 0, and point-symmetric
about ``(0, f(0))``. The relaxation is auto_LiRPA's (``BoundTanh`` /
``BoundSigmoid``, vanilla CROWN, "smoothness enhancement" on), with
``m = (l + u) / 2``:

- ``l >= 0`` (concave): lower = chord, upper = tangent at ``m``;
- ``u <= 0`` (convex): lower = tangent at ``m``, upper = chord;
- ``l < 0 < u``: the lower line is the tangent at ``d_l <= 0`` that passes
  through ``(u, f(u))`` (any tangent at ``d <= d_l`` stays below ``f`` on
  ``[l, u]``), or the chord when its slope is below ``f'(l)`` (then it does not
  cut the curve), or the tangent at ``m`` when ``d_l >= m``; the upper line
  mirrors it (tangent at ``d_u >= 0`` through ``(l, f(l))``, or the chord when
  its slope is below ``f'(u)``, or the tangent at ``m`` when ``d_u < m``).

auto_LiRPA reads ``d_l`` from a table computed on the grid ``t = 0.01 k`` at
the grid point just above ``u`` (a slightly flatter, still sound, line).
Here :func:`tangent_point` finds it by bisection at ``u`` itself (a fixed
number of steps, jittable, always on the sound side), so bounds are equal or
tighter; ``SShaped(grid=0.01)`` reproduces auto_LiRPA's table lookup exactly
(used by the tests to check the two agree). Tangent points carry no gradient
(auto_LiRPA's table lookups do not either); everything else is
differentiable, NaN-free also for ``l == u`` (where the relaxation is exact).
Where a bound is infinite, the relaxation is the constant lines at the image.

alpha-CROWN moves the tangent points (auto_LiRPA's optimisable ``BoundTanh``):
each tangent line has its point free within the range where it stays sound
(:func:`s_shaped_tangent_points`), CROWN's choice above being the start.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import ElementwiseRule, Relaxation, float_pair, register


def _iters(dtype) -> int:
    return 60 if jnp.finfo(dtype).bits > 32 else 32


def tangent_point(f, df, t, *, reach: float = 100.0, upper=False):
    """Where a tangent of an S-shaped ``f`` (inflection at 0) through ``(t, f(t))`` touches.

    ``upper=False`` (``t >= 0``): the ``d`` in ``[-t, 0]`` closest to 0 whose
    tangent stays below ``f(t)`` at ``t``; ``upper=True`` (``t <= 0``): the
    ``d`` in ``[0, -t]`` closest to 0 whose tangent stays above ``f(t)``.
    ``upper`` may be a boolean array (both kinds in one loop). Bisection from
    ``[-t, 0]`` (narrowed to ``[-reach, 0]`` when the tangent at ``-reach``
    already qualifies) keeps the far end, which always qualifies. No gradient
    flows through the result.
    """
    t = lax.stop_gradient(t)
    upper = jnp.asarray(upper)
    ft = f(t)

    def ok(d):
        v = df(d) * (t - d) + f(d)
        return jnp.where(upper, v >= ft, v <= ft)

    first = jnp.where(upper, jnp.minimum(-t, reach), -jnp.minimum(t, reach))
    far = jnp.where(ok(first), first, -t)

    def body(_, ends):
        far, near = ends
        mid = (far + near) / 2
        good = ok(mid)
        return jnp.where(good, mid, far), jnp.where(good, near, mid)

    far, _ = lax.fori_loop(0, _iters(t.dtype), body, (far, jnp.zeros_like(t)))
    return lax.stop_gradient(far)


class _Pieces(NamedTuple):
    """What the lines of an S-shaped relaxation are made of on ``[l, u]``."""

    chord: tuple  # (slope, intercept)
    pos: jax.Array  # l >= 0: concave
    neg: jax.Array  # u <= 0: convex
    chord_below: jax.Array  # the lower line is the chord
    chord_above: jax.Array  # the upper line is the chord
    init: jax.Array  # CROWN's tangent points (lower line's, upper line's), shape (2, *shape)
    lo: jax.Array  # ... their valid range
    hi: jax.Array


def _pieces(f, df, l, u, grid, reach) -> _Pieces:
    fl, fu = f(l), f(u)
    width = u - l
    wide = width > 0
    k_chord = jnp.where(wide, (fu - fl) / jnp.where(wide, width, 1.0), df(l))
    m = (l + u) / 2
    pos, neg = l >= 0, u <= 0
    both = ~pos & ~neg
    t_lo, t_up = jnp.maximum(u, 0), jnp.minimum(l, 0)
    if grid is not None:  # auto_LiRPA: index = int(t / step) + 1 into a table on t = step * k
        t_lo = (jnp.floor(t_lo / grid) + 1) * grid
        t_up = -(jnp.floor(-t_up / grid) + 1) * grid
    n = l.size  # one bisection for both tangent points
    d = tangent_point(f, df, jnp.concatenate([t_lo.ravel(), t_up.ravel()]), reach=reach,
                      upper=jnp.arange(2 * n) >= n)
    d_lo, d_up = d[:n].reshape(l.shape), d[n:].reshape(l.shape)
    # Crossing: the chord where it does not cut the curve, else a tangent at d <= d_lo
    # (CROWN: d_lo, or m when m <= d_lo, the "smoothness" choice); mirrored above.
    chord_below = pos | (both & (k_chord < df(l)))
    chord_above = neg | (both & (k_chord < df(u)))
    lower_free, upper_free = ~chord_below, ~chord_above
    init = jnp.stack([jnp.where(both, jnp.minimum(d_lo, m), m), jnp.where(both, jnp.maximum(d_up, m), m)])
    lo = jnp.stack([jnp.where(both, jnp.minimum(l, d_lo), l), jnp.where(both, d_up, l)])
    hi = jnp.stack([jnp.where(both, d_lo, u), jnp.where(both, jnp.maximum(u, d_up), u)])
    free = jnp.stack([lower_free, upper_free])  # elsewhere the point is unused: pinned
    return _Pieces((k_chord, fl - k_chord * l), pos, neg, chord_below, chord_above,
                   init, jnp.where(free, lo, init), jnp.where(free, hi, init))


def project(points, lo, hi):
    """``points`` (shape ``(k, ..., *shape)``) clipped to ``[lo, hi]`` (shape ``(k, *shape)``)."""
    expand = lambda t: t.reshape(t.shape[:1] + (1,) * (points.ndim - t.ndim) + t.shape[1:])
    return jnp.clip(points, expand(lo), expand(hi))


def s_shaped_relaxation(f, df, l, u, *, grid: float | None = None, reach: float = 100.0,
                        points=None) -> Relaxation:
    """auto_LiRPA's relaxation of an S-shaped ``f`` (convex for
    x < 0, concave for x > 0, point-symmetric about ``(0, f(0))``) on ``[l, u]``.

    ``grid``: evaluate the crossing-case tangent points at the grid point just
    beyond the bound, as auto_LiRPA's precomputed tables do (``0.01`` there).
    ``points``: alpha-CROWN's tangent points of the lower and upper line, shape
    ``(2, ..., *l.shape)``, projected onto their valid range (see
    :func:`s_shaped_tangent_points`); CROWN's own when None.
    """
    l, u = float_pair(l, u)
    p = _pieces(f, df, l, u, grid, reach)
    points = p.init if points is None else project(points, p.lo, p.hi)
    t_lo, t_up = points[0], points[1]
    k_lo, k_up = df(t_lo), df(t_up)
    k_chord, b_chord = p.chord
    return Relaxation(
        lw=jnp.where(p.chord_below, k_chord, k_lo),
        lb=jnp.where(p.chord_below, b_chord, f(t_lo) - k_lo * t_lo),
        uw=jnp.where(p.chord_above, k_chord, k_up),
        ub=jnp.where(p.chord_above, b_chord, f(t_up) - k_up * t_up),
    )


def s_shaped_tangent_points(f, df, l, u, *, grid: float | None = None, reach: float = 100.0):
    """``(init, lo, hi)``, each ``(2, *shape)``: CROWN's tangent points of the lower and
    the upper line and the range where each tangent stays a sound bound on ``[l, u]``.

    As auto_LiRPA's ``BoundTanh`` optimises them: on a convex piece (``u <= 0``) the
    lower point is free in ``[l, u]``, on a concave one the upper point; crossing 0, the
    lower point in ``[l, d_lo]`` (a tangent further left stays sound but is dominated
    by the one at ``l``), the upper one in ``[d_up, u]``. Where a line is the chord
    (optimal, not a tangent) its point is pinned (``lo == hi``).
    """
    l, u = float_pair(l, u)
    p = _pieces(f, df, l, u, grid, reach)
    return p.init, p.lo, p.hi


class SShaped(ElementwiseRule):
    """An increasing S-shaped ``f`` (``fn``, derivative ``dfn``): image ``[f(l), f(u)]``
    and :func:`s_shaped_relaxation`. ``grid=0.01`` mimics auto_LiRPA's tables.
    alpha-CROWN optimises the tangent points (:func:`s_shaped_tangent_points`)."""

    def __init__(self, grid: float | None = None):
        self.grid = grid

    @staticmethod
    def fn(x):
        raise NotImplementedError

    @staticmethod
    def dfn(x):
        raise NotImplementedError

    def image(self, l, u):
        return self.fn(l), self.fn(u)

    def relax(self, l, u):
        """:func:`s_shaped_relaxation`; where a bound is infinite, the constant lines of the image."""
        return self.relax_at(l, u, alpha=None)

    def alpha_init(self, l, u):
        l, u = float_pair(l, u)
        inf = ~(jnp.isfinite(l) & jnp.isfinite(u))
        return s_shaped_tangent_points(self.fn, self.dfn, jnp.where(inf, 0, l), jnp.where(inf, 0, u), grid=self.grid)

    def relax_at(self, l, u, alpha):
        l, u = float_pair(l, u)
        inf = ~(jnp.isfinite(l) & jnp.isfinite(u))
        r = s_shaped_relaxation(self.fn, self.dfn, jnp.where(inf, 0, l), jnp.where(inf, 0, u), grid=self.grid,
                                points=alpha)
        zero = jnp.zeros_like(r.lw)
        return Relaxation(jnp.where(inf, zero, r.lw), jnp.where(inf, self.fn(l), r.lb),
                          jnp.where(inf, zero, r.uw), jnp.where(inf, self.fn(u), r.ub))


class Tanh(SShaped):
    fn = staticmethod(jnp.tanh)

    @staticmethod
    def dfn(x):
        return 1 - jnp.tanh(x) ** 2


class Logistic(SShaped):
    fn = staticmethod(jax.nn.sigmoid)

    @staticmethod
    def dfn(x):
        s = jax.nn.sigmoid(x)
        return s * (1 - s)


class Erf(SShaped):
    fn = staticmethod(jax.scipy.special.erf)

    @staticmethod
    def dfn(x):
        return (2 / math.sqrt(math.pi)) * jnp.exp(-x * x)


register(Tanh(), P.tanh_p)
register(Logistic(), P.logistic_p)
register(Erf(), P.erf_p)
