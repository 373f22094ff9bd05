"""Gated activations ``x * gate(x)``: gelu (``gelu_p``, erf and tanh forms) and silu
(``silu_p``), fused by ``jaxlirpa.patterns``.

Each is concave on ``(-inf, -c]``, convex on ``[-c, c]`` and concave on ``[c, inf)``
(``c``: the inflection point), with one minimum at ``x_min < 0``: neither convex nor
monotone. Image on ``[l, u]``: ``[f(clip(x_min, l, u)), max(f(l), f(u))]``.

Relaxation. For a slope ``k`` the tightest sound intercepts are the exact minimum and
maximum of ``g(x) = f(x) - k x`` on ``[l, u]``, reached at ``l``, ``u`` or where ``f'(x) = k``;
``f'`` is monotone on each of the three pieces, so that root is found by bisection on each
piece (a provable check: no sampled grid). Each line then takes the slope whose line is best
at the midpoint ``m``, i.e. encloses the least area with the curve over ``[l, u]``. The optimal
lower line is the tangent at ``m`` of the convex envelope of ``f`` on ``[l, u]``: the chord, the
tangent at ``m``, or a line from ``l`` or from ``u`` tangent to the convex piece; the optimal
upper line likewise touches the concave pieces (no line touches both, as ``f'(x) + f'(-x) = 1``
keeps their slopes apart). These candidates' slopes (tangent points by bisection) are tried
for both lines, so each line is the least-area one: never looser at ``m`` than any sound line,
the decomposed path's included. Elements with an infinite bound take the constant lines of
the image.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxlirpa.patterns import gelu_p, silu_p
from jaxlirpa.rules.base import ElementwiseRule, Relaxation, float_pair, fold_max, fold_min, register

_BISECTIONS = 48


class Gated(ElementwiseRule):
    """``f(x) = x * gate(x)`` with inflection points ``-c, c`` and its minimum at ``x_min``."""

    c = 0.0
    x_min = 0.0

    def f(self, x):
        raise NotImplementedError

    def df(self, x):
        raise NotImplementedError

    def _value(self, x):
        """``f`` with its limits at infinity (``0`` at ``-inf``)."""
        finite = jnp.isfinite(x)
        fx = self.f(jnp.where(finite, x, 0.0))
        return jnp.where(finite, fx, jnp.where(x > 0, x, 0.0))

    def image(self, l, u):
        l, u = float_pair(l, u)
        lo = self._value(jnp.clip(jnp.asarray(self.x_min, l.dtype), l, u))
        return lo, jnp.maximum(self._value(l), self._value(u))

    def _critical_points(self, k, l, u):
        """Where ``f' = k`` on each of the three pieces of ``[l, u]`` (an end of the piece if nowhere)."""
        ends = jnp.stack([jnp.broadcast_to(t, k.shape) for t in (l, jnp.clip(-self.c, l, u), jnp.clip(self.c, l, u), u)])
        rising = jnp.asarray([False, True, False]).reshape((3,) + (1,) * k.ndim)
        return _bisect(lambda x: self.df(x) - k, ends[:-1], ends[1:], rising)

    def _tangent_slopes(self, l, u):
        """Slopes of the lines from ``l`` and from ``u`` tangent to the convex piece (lower
        envelope) and to the far concave piece (upper envelope)."""
        a, b = jnp.clip(-self.c, l, u), jnp.clip(self.c, l, u)
        p = jnp.stack([l, u, l, u])
        lo, hi = jnp.stack([a, a, b, l]), jnp.stack([b, b, u, a])
        rising = jnp.asarray([False, True, True, False]).reshape((4,) + (1,) * l.ndim)
        touch = _bisect(lambda t: self.f(t) + self.df(t) * (p - t) - self.f(p), lo, hi, rising)
        return self.df(touch)

    def relax(self, l, u):
        l, u = float_pair(l, u)
        lo_img, hi_img = self.image(l, u)
        inf = ~(jnp.isfinite(l) & jnp.isfinite(u))
        l, u = jnp.where(inf, 0.0, l), jnp.where(inf, 0.0, u)
        m = (l + u) / 2
        fl, fu = self.f(l), self.f(u)
        wide = u > l
        chord = jnp.where(wide, (fu - fl) / jnp.where(wide, u - l, 1.0), self.df(l))
        slopes = jnp.concatenate([jnp.stack([chord, self.df(m)]), self._tangent_slopes(l, u)])
        points = jnp.concatenate([jnp.stack([jnp.broadcast_to(l, slopes.shape), jnp.broadcast_to(u, slopes.shape)]),
                                  self._critical_points(slopes, l, u)])
        g = self.f(points) - slopes * points  # (5 points, 6 slopes, ...)
        g_lo, g_hi = fold_min(g), fold_max(g)
        lo_pick = jnp.argmax(slopes * m + g_lo, 0)[None]
        up_pick = jnp.argmin(slopes * m + g_hi, 0)[None]
        take = lambda t, i: jnp.take_along_axis(t, i, 0)[0]
        lw, lb = take(slopes, lo_pick), take(g_lo, lo_pick)
        uw, ub = take(slopes, up_pick), take(g_hi, up_pick)
        zero = jnp.zeros_like(lw)
        return Relaxation(jnp.where(inf, zero, lw), jnp.where(inf, lo_img, lb),
                          jnp.where(inf, zero, uw), jnp.where(inf, hi_img, ub))


def _bisect(h, lo, hi, rising):
    """Where ``h``, monotone on each ``[lo, hi]`` (``rising`` or falling), changes sign; the
    end nearest to it where it does not."""

    def step(_, bracket):
        lo, hi = bracket
        mid = (lo + hi) / 2
        above = (h(mid) < 0) == rising  # the root lies above mid
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = lax.fori_loop(0, _BISECTIONS, step, (lax.stop_gradient(lo), lax.stop_gradient(hi)))
    return lax.stop_gradient((lo + hi) / 2)


class GeluErf(Gated):
    """``x Phi(x)``; ``c = sqrt 2`` (``f'' = phi(x) (2 - x^2)``), ``f'(x_min) = 0``."""

    c, x_min = math.sqrt(2.0), -0.7517915246935652

    def f(self, x):
        return x * self._cdf(x)

    @staticmethod
    def _cdf(x):
        return 0.5 * jax.scipy.special.erfc(-x / math.sqrt(2.0))

    def df(self, x):
        return self._cdf(x) + x * jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


class GeluTanh(Gated):
    """``x (1 + tanh(s(x))) / 2`` with ``s = sqrt(2/pi) (x + 0.044715 x^3)``; ``c`` and ``x_min``
    solve ``f''(c) = 0`` and ``f'(x_min) = 0`` (float64)."""

    c, x_min = 1.418504008957827, -0.752461422071017
    k, a = math.sqrt(2 / math.pi), 0.044715

    def f(self, x):
        return 0.5 * x * (1 + jnp.tanh(self.k * (x + self.a * x ** 3)))

    def df(self, x):
        t = jnp.tanh(self.k * (x + self.a * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * self.k * (1 + 3 * self.a * x * x)


class Silu(Gated):
    """``x sigmoid(x)``; ``c`` and ``x_min`` solve ``f''(c) = 0`` and ``f'(x_min) = 0`` (float64)."""

    c, x_min = 2.3993572804375347, -1.278464542761073

    def f(self, x):
        return x * jax.nn.sigmoid(x)

    def df(self, x):
        s = jax.nn.sigmoid(x)
        return s * (1 + x * (1 - s))


class Gelu(ElementwiseRule):
    """``gelu_p``: the erf or the tanh form, by the equation's ``approximate``."""

    forms = {False: GeluErf(), True: GeluTanh()}

    def split(self, eqn, ops):
        x, params = super().split(eqn, ops)
        return x, [*params, eqn.params["approximate"]]

    def image(self, l, u, approximate):
        return self.forms[approximate].image(l, u)

    def relax(self, l, u, approximate):
        return self.forms[approximate].relax(l, u)


register(Gelu(), gelu_p)
register(Silu(), silu_p)
