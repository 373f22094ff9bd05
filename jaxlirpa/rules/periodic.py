"""``sin`` and ``cos``.

``image`` is the exact range: the endpoint values, widened to ``+-1`` where a
maximum (``pi/2 + 2 pi n`` for sin) or minimum lies inside ``[l, u]``.

The relaxation picks, for each side, a slope ``k`` among three candidates
(the chord's, the tangent's at the midpoint ``m``, and 0) and gives each its
tightest intercept: ``max`` (upper) or ``min`` (lower) of ``f(x) - k x`` over
``[l, u]``, found exactly from the endpoints and the critical points
``f'(x) = k`` inside (``x = +-arccos(k) - phase + 2 pi n``, at most one per
branch when ``u - l < 2 pi``). Of the three lines it keeps the one closest to
``f`` at ``m`` (the smallest area between line and curve). On a convex or
concave piece this is the chord on one side and the tangent at ``m`` on the
other, as for the functions of ``convex.py``; on a piece with an inflection
it is at least as tight at ``m`` as the chord and the midpoint tangent (each
shifted to be sound) and as the interval bound. Intervals of width ``>= 2 pi``
(or with an infinite bound) get the constant lines ``-1`` and ``1``.
This differs from auto_LiRPA's ``BoundSin`` (precomputed tangent tables);
both are sound, neither is uniformly tighter.

The intercepts carry a margin of a few ulps of ``1 + |k| max(|l|, |u|)``
against rounding in ``f(x) - k x``; critical points carry no gradient (the
intercept's gradient is exact there by the envelope theorem). Exact (up to
that margin) and NaN-free for ``l == u``.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.rules.base import ElementwiseRule, Relaxation, float_pair, fold_max, fold_min, register

TWO_PI = 2 * math.pi


def _contains(l, u, p):
    """Whether ``[l, u]`` holds a point ``p + 2 pi n``."""
    n = jnp.ceil((l - p) / TWO_PI)
    return p + TWO_PI * n <= u


class Sinusoid(ElementwiseRule):
    """``sin(x + phase)``: ``sin`` (phase 0) and ``cos`` (phase pi/2)."""

    phase = 0.0

    @staticmethod
    def f(x):
        raise NotImplementedError

    @staticmethod
    def df(x):
        raise NotImplementedError

    @staticmethod
    def _wide(l, u):
        """Width ``>= 2 pi`` (or an infinite bound): the whole range; and finite stand-ins."""
        wide = ~(u - l < TWO_PI)
        return wide, jnp.where(wide, 0.0, l), jnp.where(wide, 0.0, u)

    def image(self, l, u):
        l, u = float_pair(l, u)
        wide, l, u = self._wide(l, u)
        fl, fu = self.f(l), self.f(u)
        top = wide | _contains(l, u, math.pi / 2 - self.phase)
        bottom = wide | _contains(l, u, -math.pi / 2 - self.phase)
        lo = jnp.where(bottom, -1.0, jnp.minimum(fl, fu))
        hi = jnp.where(top, 1.0, jnp.maximum(fl, fu))
        return lo, hi

    def _intercepts(self, l, u, k):
        """``min`` and ``max`` of ``f(x) - k x`` on ``[l, u]`` (``u - l < 2 pi``), widened by a margin.

        Candidates: the endpoints and, per branch ``x = +-arccos(k) - phase + 2 pi n``,
        the first point at or after ``l`` (the next one is past ``u``), clipped into ``[l, u]``
        (a point rounded just outside lands on an endpoint: a second-order change)."""
        a = jnp.arccos(jnp.clip(lax.stop_gradient(k), -1.0, 1.0))
        xs = [l, u]
        for base in (a - self.phase, -a - self.phase):
            n = jnp.ceil(lax.stop_gradient((l - base) / TWO_PI))
            xs.append(jnp.clip(lax.stop_gradient(base + TWO_PI * n), l, u))
        g = [self.f(x) - k * x for x in xs]
        eps = jnp.finfo(l.dtype).eps
        margin = 8 * eps * (1 + jnp.abs(k) * jnp.maximum(jnp.abs(l), jnp.abs(u)))
        return fold_min(g) - margin, fold_max(g) + margin

    def relax(self, l, u):
        l, u = float_pair(l, u)
        wide, l, u = self._wide(l, u)
        width = u - l
        nz = width > 0
        fl, fu = self.f(l), self.f(u)
        m = (l + u) / 2
        slopes = [jnp.where(nz, (fu - fl) / jnp.where(nz, width, 1.0), self.df(l)), self.df(m), jnp.zeros_like(l)]
        lower = upper = None  # (slope, its line at the midpoint): lower wants it high, upper low
        for k in slopes:
            bl, bu = self._intercepts(l, u, k)
            if lower is None:
                lower, upper = (k, k * m + bl), (k, k * m + bu)
                continue
            take_l, take_u = k * m + bl > lower[1], k * m + bu < upper[1]
            lower = tuple(jnp.where(take_l, new, old) for new, old in zip((k, k * m + bl), lower))
            upper = tuple(jnp.where(take_u, new, old) for new, old in zip((k, k * m + bu), upper))
        # Each intercept is computed for the slope chosen, not chosen beside it: under jit XLA may
        # evaluate a comparison of near-equal lines once per consumer with other rounding, and
        # a slope and an intercept taken from different lines are no bound (seen: 4e-3 outside).
        bl, bu = self._intercepts(l, u, lower[0])[0], self._intercepts(l, u, upper[0])[1]
        one = jnp.ones_like(l)
        return Relaxation(jnp.where(wide, 0.0, lower[0]), jnp.where(wide, -one, bl),
                          jnp.where(wide, 0.0, upper[0]), jnp.where(wide, one, bu))


class Sin(Sinusoid):
    phase = 0.0
    f = staticmethod(jnp.sin)
    df = staticmethod(jnp.cos)


class Cos(Sinusoid):
    phase = math.pi / 2

    f = staticmethod(jnp.cos)

    @staticmethod
    def df(x):
        return -jnp.sin(x)


register(Sin(), P.sin_p)
register(Cos(), P.cos_p)
