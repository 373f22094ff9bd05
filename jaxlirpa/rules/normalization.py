"""Normalisation as a whole: ``y = z * r`` with ``r = (s + eps)^(-1/2)`` and ``s = mean(z^2)``
over the normalised axes (``normalize_p(z, s)``, fused by ``jaxlirpa.patterns`` from layer
norm, whose centring ``z = x - mean(x)`` stays linear and exact, and from RMS norm).

The variance ``s`` is the graph's own node, an operand: every method bounds it from the input
as the primitive-by-primitive (decomposed) path does, so the rule sees the correlations that
the box of ``z`` has lost, and its planes may hand part of the bound back to ``s``. On the box
``l <= z <= u`` (``K`` entries) and ``s`` in its interval (met with the range of ``mean(z^2)``
on the box):

- **interval**: the exact range of ``y`` over the box of ``z`` (``y_k = g(z_k, Q_k)`` with
  ``Q_k = sum_{j != k} z_j^2`` and ``g(t, Q) = t / sqrt((t^2 + Q) / K + eps)``, increasing in
  ``t`` and, for ``t > 0``, decreasing in ``Q``: each bound takes ``t`` at an end and ``Q_k`` at
  the end of its range that helps), met with the product of ``[l, u]`` and ``r``'s interval:
  never looser than the decomposed path's interval;
- **planes** ``W z + c s + b``, per element the best of

  - the interval's constant;
  - the mean-value plane in ``z`` alone: with ``J(z) = r (I - y y^T / K)`` and ``z0`` the
    midpoint, ``y(z) - y(z0) - J(z0)(z - z0)`` lies within ``+-rho``,
    ``rho_k = sum_j max |J_kj(seg) - J_kj(z0)| w_j``, ``J(seg)`` enclosing ``J`` on the segments
    from ``z0`` to reachable points (``mean(z^2)`` is convex: below ``max(s(z0), s_hi)`` there);
  - McCormick's four planes of ``z_k * r`` (one at each corner of ``[l_k, u_k] x [r_lo, r_hi]``)
    with ``r`` replaced by the lines of ``rsqrt`` in ``s``: the decomposed path's own planes
    among them;

  chosen per element by what CROWN will likely make of them, ``s`` replaced by the lines of
  the squares in ``z`` (tangents at ``z0`` below, chords above): among the planes, the best
  centre value less the root-sum-square of the terms' half ranges on the box (as if ``z``'s
  entries moved independently: the box has lost their correlations, so its worst case would
  undersell every plane against the constant); the constant where it beats that plane's
  estimate halfway between this and the worst case on the box. Only soundness rests on the
  planes; the choice is a heuristic, which on dense -> norm picks the decomposed planes
  (or the other McCormick corner) at small boxes and the constant at large ones.

The planes are dense ``K x K`` matrices per normalised vector.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxlirpa.patterns import normalize_p
from jaxlirpa.rules.base import Interval, LinearBounds, Rule, _pos_neg, _rowsum, register
from jaxlirpa.rules.convex import Rsqrt
from jaxlirpa.rules.softmax import merged_axes, split_axes


class Plane(NamedTuple):
    """``W z + c s + bias`` on the last axis: ``W`` of shape ``(..., K, K)``, ``c`` and ``bias``
    ``(..., K)``, ``s`` one number per vector."""

    W: jax.Array
    c: jax.Array
    bias: jax.Array


def _sum_of_others(t):
    """``sum_{j != k} t_j`` for every ``k`` of the last axis, without cancellation."""
    zero = jnp.zeros_like(t[..., :1])
    left = jnp.concatenate([zero, jnp.cumsum(t, -1)[..., :-1]], -1)
    right = jnp.concatenate([jnp.cumsum(t[..., ::-1], -1)[..., ::-1][..., 1:], zero], -1)
    return left + right


def _squares(l, u):
    """The interval of ``z^2`` for ``z`` in ``[l, u]``."""
    return jnp.clip(0.0, l, u) ** 2, jnp.maximum(l * l, u * u)


def _product(al, au, bl, bu):
    corners = jnp.stack(jnp.broadcast_arrays(al * bl, al * bu, au * bl, au * bu))
    return jnp.nanmin(corners, 0), jnp.nanmax(corners, 0)


def normalize_image(l, u, eps):
    """The exact range of ``z * rsqrt(mean(z^2) + eps)`` over the box (last axis)."""
    K = l.shape[-1]
    sq_lo, sq_hi = _squares(l, u)
    q_lo, q_hi = _sum_of_others(sq_lo), _sum_of_others(sq_hi)
    g = lambda t, q: t * lax.rsqrt((t * t + q) / K + eps)
    lo, hi = g(l, jnp.where(l >= 0, q_hi, q_lo)), g(u, jnp.where(u >= 0, q_lo, q_hi))
    bound = jnp.sqrt(jnp.asarray(K, lo.dtype))  # |y_k| <= sqrt(K) always: the range of an unbounded box
    return jnp.where(jnp.isnan(lo), -bound, jnp.clip(lo, -bound, bound)), jnp.where(jnp.isnan(hi), bound, jnp.clip(hi, -bound, bound))


def _variance_range(l, u, s_lo, s_hi):
    """``s``'s interval met with the range of ``mean(z^2)`` on the box, and that range."""
    sq_lo, sq_hi = _squares(l, u)
    box_lo, box_hi = jnp.mean(sq_lo, -1, keepdims=True), jnp.mean(sq_hi, -1, keepdims=True)
    lo = jnp.fmax(s_lo, box_lo)
    return lo, jnp.maximum(jnp.fmin(s_hi, box_hi), lo), box_lo, box_hi


def _meet(image, l, u, r_lo, r_hi):
    """The box ``image`` met with ``[l, u] * [r_lo, r_hi]``."""
    p_lo, p_hi = _product(l, u, r_lo, r_hi)
    return jnp.fmax(image[0], p_lo), jnp.fmin(image[1], p_hi)


def normalize_interval(l, u, s_lo, s_hi, eps, image=None):
    """The interval of ``y`` for ``z`` in ``[l, u]`` and its ``s = mean(z^2)`` in ``[s_lo, s_hi]``
    (last axis); ``image``: the box image, if known."""
    s_lo, s_hi, _, _ = _variance_range(l, u, s_lo, s_hi)
    image = normalize_image(l, u, eps) if image is None else image
    return _meet(image, l, u, lax.rsqrt(s_hi + eps), lax.rsqrt(s_lo + eps))


def _mean_value_planes(l, u, image, s_hi, box_lo, box_hi, eps):
    K = l.shape[-1]
    z0, w = (l + u) / 2, (u - l) / 2
    s0 = jnp.mean(z0 * z0, -1, keepdims=True)
    r0 = lax.rsqrt(s0 + eps)
    y0 = z0 * r0
    eye = jnp.eye(K, dtype=l.dtype)
    J0 = r0[..., None] * (eye - y0[..., :, None] * y0[..., None, :] / K)
    # On a segment from z0 to a reachable z: s <= max(s(z0), s_hi), and s >= the box's least.
    r_lo = lax.rsqrt(jnp.minimum(jnp.maximum(s0, s_hi), box_hi) + eps)
    r_hi = lax.rsqrt(box_lo + eps)
    y_lo, y_hi = _meet(image, l, u, r_lo, r_hi)
    p_lo, p_hi = _product(y_lo[..., :, None], y_hi[..., :, None], y_lo[..., None, :], y_hi[..., None, :])
    y_sq_lo, y_sq_hi = _squares(y_lo, y_hi)  # y_k * y_k: a square, not a product of two intervals
    p_lo = jnp.where(eye > 0, y_sq_lo[..., None], p_lo)
    p_hi = jnp.where(eye > 0, y_sq_hi[..., None], p_hi)
    m_lo, m_hi = eye - p_hi / K, eye - p_lo / K
    r_lo, r_hi = r_lo[..., None], r_hi[..., None]
    J_lo, J_hi = jnp.minimum(r_lo * m_lo, r_hi * m_lo), jnp.maximum(r_lo * m_hi, r_hi * m_hi)
    rho = jnp.einsum("...kj,...j->...k", jnp.maximum(J_hi - J0, J0 - J_lo), w)
    bias = y0 - jnp.einsum("...kj,...j->...k", J0, z0)
    zero = jnp.zeros_like(bias)
    return Plane(J0, zero, bias - rho), Plane(J0, zero, bias + rho)


def _corner_planes(l, u, s_lo, s_hi, eps) -> tuple[list[Plane], list[Plane]]:
    """McCormick's planes of ``z_k * r`` at the corners ``(l, r_lo)``, ``(u, r_hi)`` (lower) and
    ``(l, r_hi)``, ``(u, r_lo)`` (upper): ``r_c z_k + z_c r - z_c r_c``, with ``z_c r`` bounded
    by the ``rsqrt`` line in ``s`` on the side its sign needs."""
    K = l.shape[-1]
    r_lo, r_hi = lax.rsqrt(s_hi + eps), lax.rsqrt(s_lo + eps)
    lines = Rsqrt().relax(s_lo + eps, s_hi + eps)  # lines in s + eps
    eye = jnp.eye(K, dtype=l.dtype)

    def plane(z_c, r_c, upper):
        below = (z_c >= 0) != upper  # where z_c r takes r's lower line
        slope = jnp.where(below, lines.lw, lines.uw)
        intercept = jnp.where(below, lines.lb, lines.ub) + slope * eps
        return Plane(r_c[..., None] * eye, z_c * slope, z_c * (intercept - r_c))

    return ([plane(l, r_lo, False), plane(u, r_hi, False)], [plane(l, r_hi, True), plane(u, r_lo, True)])


def _estimates(plane: Plane, z0, w, s_lines):
    """Two estimates of the least value CROWN makes of a lower plane over the box ``z0 +- w``,
    with ``s`` replaced by ``s_lines`` (below, above) in ``z``, the side ``c`` needs: the worst
    case on the box (pessimistic: the box has lost the correlations of ``z``), and the centre
    less the root-sum-square of the terms' half ranges (as if the terms were independent)."""
    (g_lo, h_lo), (g_hi, h_hi) = s_lines
    rising = plane.c >= 0
    W = plane.W + plane.c[..., None] * jnp.where(rising[..., None], g_lo[..., None, :], g_hi[..., None, :])
    centre = jnp.einsum("...kj,...j->...k", W, z0) + plane.bias + plane.c * jnp.where(rising, h_lo, h_hi)
    worst = centre - jnp.einsum("...kj,...j->...k", jnp.abs(W), w)
    typical = centre - jnp.sqrt(jnp.einsum("...kj,...j->...k", W * W, w * w))
    return worst, typical


def _best(constant, planes: list[Plane], estimates, bad) -> Plane:
    """Per element, the plane of the best typical estimate (NaN: never), or the constant where
    it beats that plane's estimate halfway between typical and worst, or where ``bad``. One
    index, an ``argmax`` over the constant and the planes (a reduction: XLA computes it once),
    picks W, c and the bias, so they always come from one sound plane: a comparison made
    once per select could come out differently in each (sin and cos once did, rules/periodic)."""
    flat = Plane(jnp.zeros_like(planes[0].W), jnp.zeros_like(planes[0].c), constant)
    stacked = Plane(*(jnp.stack(jnp.broadcast_arrays(*t)) for t in zip(flat, *planes)))
    worst, typical = (jnp.stack(e) for e in zip(*map(estimates, planes)))
    best = jnp.argmax(jnp.where(jnp.isnan(typical), -jnp.inf, typical), 0)
    mid = (worst + typical) / 2
    one = (jnp.arange(len(planes)).reshape(-1, *[1] * best.ndim) == best) & ~bad & ~jnp.isnan(mid)
    scores = jnp.concatenate([jnp.broadcast_to(constant, best.shape)[None], jnp.where(one, mid, -jnp.inf)])
    i = jnp.argmax(scores, 0)[None]  # ties: the constant (index 0), as mid must beat it
    pick = lambda t, idx: jnp.take_along_axis(t, idx, 0)[0]  # noqa: E731
    return Plane(pick(stacked.W, i[..., None]), pick(stacked.c, i), pick(stacked.bias, i))


def normalize_planes(l, u, s_lo, s_hi, eps) -> tuple[Plane, Plane]:
    """Lower and upper planes of ``y`` in ``(z, s)`` for ``z`` in ``[l, u]`` and ``s`` in
    ``[s_lo, s_hi]`` (last axis; ``s_lo``, ``s_hi`` of size 1 there)."""
    image = normalize_image(l, u, eps)
    y_lo, y_hi = normalize_interval(l, u, s_lo, s_hi, eps, image)
    bad = ~jnp.all(jnp.isfinite(l) & jnp.isfinite(u), -1, keepdims=True)  # these take the constants
    l, u = jnp.where(bad, 0.0, l), jnp.where(bad, 0.0, u)
    s_lo, s_hi, box_lo, box_hi = _variance_range(l, u, s_lo, s_hi)
    mv_lower, mv_upper = _mean_value_planes(l, u, image, s_hi, box_lo, box_hi, eps)
    corners_lower, corners_upper = _corner_planes(l, u, s_lo, s_hi, eps)
    lower, upper = [mv_lower, *corners_lower], [mv_upper, *corners_upper]

    K = l.shape[-1]
    z0, w = (l + u) / 2, (u - l) / 2
    tangents = (2 * z0 / K, -jnp.mean(z0 * z0, -1, keepdims=True))  # mean(z^2) >= its tangent plane at z0
    chords = ((l + u) / K, -jnp.mean(l * u, -1, keepdims=True))  # mean(z^2) <= the mean of the squares' chords
    estimates = lambda p: _estimates(p, z0, w, (tangents, chords))
    negated = lambda p: Plane(-p.W, -p.c, -p.bias)  # an upper plane of y is a lower one of -y
    lower = _best(y_lo, lower, estimates, bad)
    upper = negated(_best(-y_hi, [negated(p) for p in upper], estimates, bad))
    return lower, upper


class Normalize(Rule):
    """``normalize_p(z, s)``, both operands perturbed (``s`` is computed from ``z``)."""

    def accepts(self, eqn, perturbed):
        return tuple(perturbed) == (True, True)

    def _merged(self, eqn, ops):
        axes = eqn.params["axes"]
        return [merged_axes(t, axes) for op in ops for t in op.interval]

    def interval(self, eqn, ops):
        axes, shape = eqn.params["axes"], eqn.out_avals[0].shape
        lo, hi = normalize_interval(*self._merged(eqn, ops), eqn.params["eps"])
        return Interval(split_axes(lo, axes, shape), split_axes(hi, axes, shape))

    def backward(self, eqn, ops, lA, uA, alpha=None):
        axes = eqn.params["axes"]
        z_shape, s_shape = (a.shape for a in eqn.in_avals)
        lower, upper = normalize_planes(*self._merged(eqn, ops), eqn.params["eps"])

        def pull(A, pos_plane, neg_plane):
            if A is None:
                return None, None, 0.0
            pos, neg = _pos_neg(merged_axes(A, axes, lead=1))
            Az = jnp.einsum("...k,...kj->...j", pos, pos_plane.W) + jnp.einsum("...k,...kj->...j", neg, neg_plane.W)
            As = jnp.sum(pos * pos_plane.c + neg * neg_plane.c, -1, keepdims=True)
            bias = _rowsum(pos * pos_plane.bias + neg * neg_plane.bias)
            return split_axes(Az, axes, z_shape, lead=1), split_axes(As, axes, s_shape, lead=1), bias

        lz, ls, lbias = pull(lA, lower, upper)
        uz, us, ubias = pull(uA, upper, lower)
        return [(lz, uz), (ls, us)], lbias, ubias

    def forward(self, eqn, ops):
        axes, shape = eqn.params["axes"], eqn.out_avals[0].shape
        lower, upper = normalize_planes(*self._merged(eqn, ops), eqn.params["eps"])
        (zlw, zlb, zuw, zub), (slw, slb, suw, sub) = (
            (merged_axes(lw, axes, 1), merged_axes(lb, axes), merged_axes(uw, axes, 1), merged_axes(ub, axes))
            for lw, lb, uw, ub in (op.linear for op in ops))
        mat = lambda J, t: jnp.einsum("...kj,...j->...k", J, t)

        def push(plane, z_pos, z_neg, s_pos, s_neg):
            """``plane`` applied to linear bounds ``(w, b)`` of ``z`` and ``s``, each taken where its coefficient is positive or negative."""
            (jp, jn), (cp, cn) = _pos_neg(plane.W), _pos_neg(plane.c)
            w = mat(jp, z_pos[0]) + mat(jn, z_neg[0]) + cp * s_pos[0] + cn * s_neg[0]
            b = mat(jp, z_pos[1]) + mat(jn, z_neg[1]) + cp * s_pos[1] + cn * s_neg[1] + plane.bias
            return w, b

        lw, lb = push(lower, (zlw, zlb), (zuw, zub), (slw, slb), (suw, sub))
        uw, ub = push(upper, (zuw, zub), (zlw, zlb), (suw, sub), (slw, slb))
        out = lambda t, lead=0: split_axes(t, axes, shape, lead)
        return LinearBounds(out(lw, 1), out(lb), out(uw, 1), out(ub))


register(Normalize(), normalize_p)
