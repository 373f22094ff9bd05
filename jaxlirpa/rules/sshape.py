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
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import ElementwiseRule, Relaxation, register


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


def s_shaped_relaxation(f, df, l, u, *, grid: float | None = None, reach: float = 100.0) -> Relaxation:
    """auto_LiRPA's relaxation of an S-shaped ``f`` (convex for
    x < 0, concave for x > 0, point-symmetric about ``(0, f(0))``) on ``[l, u]``.

    ``grid``: evaluate the crossing-case tangent points at the grid point just
    beyond the bound, as auto_LiRPA's precomputed tables do (``0.01`` there).
    """
    l, u = jnp.asarray(l), jnp.asarray(u)
    dtype = jnp.result_type(l, u)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    l, u = jnp.broadcast_arrays(l.astype(dtype), u.astype(dtype))
    fl, fu = f(l), f(u)
    width = u - l
    wide = width > 0
    k_chord = jnp.where(wide, (fu - fl) / jnp.where(wide, width, 1.0), df(l))
    b_chord = fl - k_chord * l
    m = (l + u) / 2
    k_m = df(m)
    b_m = f(m) - k_m * m

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
    k_dlo, k_dup = df(d_lo), df(d_up)
    b_dlo, b_dup = f(d_lo) - k_dlo * d_lo, f(d_up) - k_dup * d_up

    # Crossing case: tangent at the tangent point, or the chord, or (smoothness) the tangent at m.
    direct_lo, direct_up = k_chord < df(l), k_chord < df(u)
    cross_lw = jnp.where(d_lo >= m, k_m, jnp.where(direct_lo, k_chord, k_dlo))
    cross_lb = jnp.where(d_lo >= m, b_m, jnp.where(direct_lo, b_chord, b_dlo))
    cross_uw = jnp.where(d_up < m, k_m, jnp.where(direct_up, k_chord, k_dup))
    cross_ub = jnp.where(d_up < m, b_m, jnp.where(direct_up, b_chord, b_dup))
    return Relaxation(
        lw=jnp.where(both, cross_lw, jnp.where(pos, k_chord, k_m)),
        lb=jnp.where(both, cross_lb, jnp.where(pos, b_chord, b_m)),
        uw=jnp.where(both, cross_uw, jnp.where(pos, k_m, k_chord)),
        ub=jnp.where(both, cross_ub, jnp.where(pos, b_m, b_chord)),
    )


class SShaped(ElementwiseRule):
    """An increasing S-shaped ``f`` (``fn``, derivative ``dfn``): image ``[f(l), f(u)]``
    and :func:`s_shaped_relaxation`. ``grid=0.01`` mimics auto_LiRPA's tables."""

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
        l, u = jnp.asarray(l), jnp.asarray(u)
        inf = ~(jnp.isfinite(l) & jnp.isfinite(u))
        r = s_shaped_relaxation(self.fn, self.dfn, jnp.where(inf, 0, l), jnp.where(inf, 0, u), grid=self.grid)
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
