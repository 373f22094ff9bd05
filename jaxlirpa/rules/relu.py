"""Piecewise-linear activations: ``max``/``min`` with a constant (ReLU, clip,
relu6), leaky ReLU (fused from its ``select_n`` lowering) and ``abs``.

Relaxations follow auto_LiRPA's defaults: the upper line is the chord over
``[l, u]``; the lower slope is "adaptive" (the side of the kink with the
larger part of the interval), which minimises the relaxation's area.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.graph import leaky_relu_p
from jaxlirpa.rules.base import ElementwiseRule, Relaxation, register


def _chord(l, u, fl, fu, crossing):
    """Slope and intercept of the line through (l, fl) and (u, fu), safe where l == u."""
    slope = (fu - fl) / jnp.where(crossing, u - l, 1.0)
    return slope, fl - slope * l


def _offset(slope, c):
    """``(1 - slope) * c``, the intercept of a line through ``(c, c)``: 0 where the slope is 1,
    even for ``c = -inf`` (``max(x, -inf)``), where the product would be NaN."""
    return (1 - slope) * jnp.where(slope == 1, 0.0, c)


class MaxWithConstant(ElementwiseRule):
    """``max(x, c)``: ReLU when c = 0."""

    def kink(self, c):
        return c

    def image(self, l, u, c):
        return jnp.maximum(l, c), jnp.maximum(u, c)

    def relax(self, l, u, c):
        active, inactive = l >= c, u <= c
        crossing = ~active & ~inactive
        slope, intercept = _chord(l, u, jnp.where(crossing, c, l), u, crossing)  # finite where unused
        lower_slope = jnp.where(active | (crossing & (u - c > c - l)), 1.0, 0.0).astype(l.dtype)
        return Relaxation(
            lw=lower_slope,
            lb=_offset(lower_slope, c),
            uw=jnp.where(crossing, slope, lower_slope),
            ub=jnp.where(crossing, intercept, _offset(lower_slope, c)),
        )


    def slope_range(self, l, u, c):
        return jnp.zeros_like(l), jnp.ones_like(l)

    def flat(self, l, u, c):
        """Where the output is the constant ``c`` (both lines have slope 0, whatever alpha)."""
        return u <= c

    def passes(self, l, u, c):
        """Where the output is the input itself (both lines are the identity, whatever alpha)."""
        return l >= c

    def lower_line(self, l, u, c, slope):
        """``c + s (x - c)`` with s in [0, 1] where the kink is inside [l, u]."""
        crossing = (l < c) & (u > c)
        s = jnp.where(crossing, jnp.clip(slope, 0.0, 1.0), jnp.where(l >= c, 1.0, 0.0))
        return s, _offset(s, c)


class MinWithConstant(ElementwiseRule):
    """``min(x, c) = -max(-x, -c)``."""

    _max = MaxWithConstant()

    def kink(self, c):
        return c

    def image(self, l, u, c):
        return jnp.minimum(l, c), jnp.minimum(u, c)

    def relax(self, l, u, c):
        r = self._max.relax(-u, -l, -c)
        return Relaxation(lw=r.uw, lb=-r.ub, uw=r.lw, ub=-r.lb)

    def flat(self, l, u, c):
        """Where the output is the constant ``c``."""
        return l >= c

    def passes(self, l, u, c):
        """Where the output is the input itself."""
        return u <= c


class LeakyRelu(ElementwiseRule):
    """``x if x >= 0 else a * x``. For a <= 1 the function is convex: chord above,
    a line through 0 with slope 1 or a below; for a > 1 the roles swap.

    The tangent slope is 1 where the chord's slope exceeds (1 + a) / 2... as
    auto_LiRPA chooses it (chord slope > 0.5), so bounds match its own; for
    a = 0 both rules are the area-minimising one."""

    def accepts(self, eqn, perturbed):
        return perturbed[0] and not perturbed[1]

    def kink(self, a):
        return 0.0

    def image(self, l, u, a):
        f = lambda t: jnp.where(t >= 0, t, a * t)
        crossing = (l < 0) & (u > 0)
        lo, hi = jnp.minimum(f(l), f(u)), jnp.maximum(f(l), f(u))
        return jnp.where(crossing, jnp.minimum(lo, 0), lo), jnp.where(crossing, jnp.maximum(hi, 0), hi)

    def relax(self, l, u, a):
        a = jnp.asarray(a, l.dtype) + 0 * l
        active, inactive = l >= 0, u <= 0
        crossing = ~active & ~inactive
        chord_slope, chord_icpt = _chord(l, u, a * l, u, crossing)
        tangent = jnp.where(chord_slope > 0.5, 1.0, a)
        stable = jnp.where(active, 1.0, a)
        convex = a <= 1
        lw = jnp.where(crossing, jnp.where(convex, tangent, chord_slope), stable)
        uw = jnp.where(crossing, jnp.where(convex, chord_slope, tangent), stable)
        lb = jnp.where(crossing & ~convex, chord_icpt, 0.0)
        ub = jnp.where(crossing & convex, chord_icpt, 0.0)
        return Relaxation(lw, lb, uw, ub)


    def slope_range(self, l, u, a):
        a = jnp.asarray(a, l.dtype) + 0 * l
        return jnp.minimum(a, 1.0), jnp.maximum(a, 1.0)

    def lower_line(self, l, u, a, slope):
        """A line through 0 with slope in [a, 1] (convex case only; for a > 1 the
        chord stays the lower line)."""
        a = jnp.asarray(a, l.dtype) + 0 * l
        crossing = (l < 0) & (u > 0)
        r = self.relax(l, u, a)
        s = jnp.where(crossing & (a <= 1), jnp.clip(slope, a, 1.0), r.lw)
        return s, jnp.where(crossing & (a <= 1), 0.0, r.lb)


class Abs(ElementwiseRule):
    """``|x|``: chord above; below, slope +1 or -1 through 0, whichever side of
    0 holds more of the interval (the smaller-area choice)."""

    def kink(self):
        return 0.0

    def image(self, l, u):
        crossing = (l < 0) & (u > 0)
        lo = jnp.where(crossing, 0.0, jnp.minimum(jnp.abs(l), jnp.abs(u)))
        return lo, jnp.maximum(jnp.abs(l), jnp.abs(u))

    def relax(self, l, u):
        active, inactive = l >= 0, u <= 0
        crossing = ~active & ~inactive
        slope, intercept = _chord(l, u, -l, u, crossing)
        lower = jnp.where(active | (crossing & (u > -l)), 1.0, -1.0).astype(l.dtype)
        return Relaxation(
            lw=lower,
            lb=jnp.zeros_like(l),
            uw=jnp.where(crossing, slope, lower),
            ub=jnp.where(crossing, intercept, 0.0),
        )


    def slope_range(self, l, u):
        return -jnp.ones_like(l), jnp.ones_like(l)

    def lower_line(self, l, u, slope):
        crossing = (l < 0) & (u > 0)
        return jnp.where(crossing, jnp.clip(slope, -1.0, 1.0), jnp.where(l >= 0, 1.0, -1.0)), jnp.zeros_like(slope)


register(MaxWithConstant(), P.max_p)
register(MinWithConstant(), P.min_p)
register(LeakyRelu(), leaky_relu_p)
register(Abs(), P.abs_p)
