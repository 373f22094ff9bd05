"""Softmax as a whole (``softmax_p``, fused by ``jaxlirpa.patterns``): the LSE-based bounds of
Wei et al., "Convex Bounds on the Softmax Function" (AISTATS 2023), auto_LiRPA's default.

On the box ``l <= x <= u`` (over the softmax axes, ``K`` entries), with ``p = softmax(x)``:

- **interval** (exact over the box): ``p_k`` grows with ``x_k`` and falls with every other
  entry, so ``p_k >= sigmoid(l_k - lse_{j != k} u_j)`` and ``p_k <= sigmoid(u_k - lse_{j != k} l_j)``;
- **lower plane**: ``exp(x_j)`` lies below its chord on ``[l_j, u_j]``, so
  ``p_k >= L_k(x) = exp(x_k) / sum_j chord_j(x_j)``, which is convex: its tangent plane at the
  midpoint ``x0`` lies below it (the paper's Eqs. 39-40);
- **upper plane**: ``log p_k = x_k - lse(x)`` is concave and lies in ``[A_k, B_k]`` (the logs of
  the interval), where ``exp`` lies below its chord, so ``p_k <= U_k(x) = e^A + c_k (x_k - lse(x) - A)``,
  concave: its tangent plane at ``x0`` lies above it (Eqs. 46-47).

Each plane's Jacobian is ``diag(d) - outer(a, v)``, applied to ``A`` in ``O(K)`` per row.
Slices with an infinite bound take the constant planes of the interval.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.patterns import softmax_p
from jaxlirpa.rules.base import Interval, LinearBounds, Rule, _pos_neg, _rowsum, register


def merged_axes(t, axes, lead: int = 0):
    """``t`` with ``axes`` (counted after ``lead`` leading axes) moved last and merged into one."""
    rest = [d for d in range(t.ndim - lead) if d not in axes]
    t = jnp.transpose(t, [*range(lead), *(lead + d for d in [*rest, *axes])])
    return t.reshape(*t.shape[:lead + len(rest)], -1)


def split_axes(t, axes, shape, lead: int = 0):
    """The inverse of :func:`merged_axes` for an array of ``shape`` (after ``lead`` axes)."""
    rest = [d for d in range(len(shape)) if d not in axes]
    t = t.reshape(*t.shape[:lead], *(shape[d] for d in [*rest, *axes]))
    return jnp.transpose(t, [*range(lead), *(lead + int(i) for i in np.argsort([*rest, *axes]))])


def _lse_of_others(t):
    """``lse_{j != k} t_j`` for every ``k`` of the last axis, without cancellation: the
    exclusive cumulative logsumexp from both ends, padded far below (``exp`` of the pad is 0)."""
    pad = jnp.min(t, -1, keepdims=True) - 200.0
    left = jnp.concatenate([pad, jax.lax.cumlogsumexp(t, axis=t.ndim - 1)[..., :-1]], -1)
    right = jnp.concatenate([jax.lax.cumlogsumexp(t, axis=t.ndim - 1, reverse=True)[..., 1:], pad], -1)
    return jnp.logaddexp(left, right)


def _exp_chord(l, u):
    """Slope of the chord of ``exp`` on ``[l, u]`` (``exp(l)`` where ``l == u``), without overflow
    for ``u <= 0`` and accurate for narrow intervals."""
    d = u - l
    narrow = d <= 1
    safe = jnp.where(d > 0, d, 1.0)
    return jnp.where(narrow, jnp.exp(l) * jnp.where(d > 0, jnp.expm1(jnp.minimum(d, 1.0)) / safe, 1.0),
                     (jnp.exp(u) - jnp.exp(l)) / safe)


def log_bounds(l, u):
    """``log`` of the exact interval of softmax on the box (last axis)."""
    return jax.nn.log_sigmoid(l - _lse_of_others(u)), jax.nn.log_sigmoid(u - _lse_of_others(l))


class LowRankPlane(NamedTuple):
    """``(diag(d) - outer(a, v)) x + b`` on the last axis (a softmax plane)."""

    d: jax.Array
    a: jax.Array
    v: jax.Array
    bias: jax.Array

    def apply(self, A):
        """``A @ J`` and ``A @ b`` for rows ``A`` (leading axes) on the last axis, in ``O(K)``."""
        return A * self.d - jnp.sum(A * self.a, -1, keepdims=True) * self.v, jnp.sum(A * self.bias, -1)

    def matrix(self):
        eye = jnp.eye(self.d.shape[-1], dtype=self.d.dtype)
        return self.d[..., :, None] * eye - self.a[..., :, None] * self.v[..., None, :]


class DensePlane(NamedTuple):
    """``W x + b`` on the last axis, ``W`` of shape ``(..., K, K)``."""

    W: jax.Array
    bias: jax.Array

    def apply(self, A):
        return jnp.einsum("...k,...kj->...j", A, self.W), jnp.sum(A * self.bias, -1)

    def matrix(self):
        return self.W


def softmax_planes(l, u) -> tuple[LowRankPlane, LowRankPlane]:
    """Lower and upper planes of softmax over the last axis on ``[l, u]``."""
    bad = ~jnp.all(jnp.isfinite(l) & jnp.isfinite(u), -1, keepdims=True)
    lo_log, hi_log = log_bounds(l, u)
    l, u = jnp.where(bad, 0.0, l), jnp.where(bad, 0.0, u)
    x0 = (l + u) / 2
    top = jnp.max(u, -1, keepdims=True)
    ls, us, xs = l - top, u - top, x0 - top  # shifted: exp stays <= 1

    kappa = _exp_chord(ls, us)
    se = jnp.sum(jnp.exp(ls) + kappa * (xs - ls), -1, keepdims=True)
    low0 = jnp.exp(xs) / se

    A, B = log_bounds(l, u)
    log_p0 = jax.nn.log_softmax(x0, -1)
    c = _exp_chord(A, B)
    up0 = jnp.exp(A) + c * (log_p0 - A)
    p0 = jnp.exp(log_p0)

    def plane(d, a, v, f0, const):
        b = f0 - (d * x0 - a * jnp.sum(v * x0, -1, keepdims=True))
        return LowRankPlane(*(jnp.where(bad, 0.0, t) for t in (d, a, v)), jnp.where(bad, const, b))

    return plane(low0, low0 / se, kappa, low0, jnp.exp(lo_log)), plane(c, c, p0, up0, jnp.exp(hi_log))


class VectorRule(Rule):
    """A rule for a primitive whose output over ``eqn.params["axes"]`` depends on the whole
    input vector there: subclasses give ``image`` and lower/upper ``planes`` (objects with
    ``apply``, ``matrix`` and ``bias``) of ``(l, u)`` with those axes merged last."""

    def accepts(self, eqn, perturbed):
        return tuple(perturbed) == (True,)

    def image(self, l, u, eqn):
        raise NotImplementedError

    def planes(self, l, u, eqn):
        raise NotImplementedError

    def _merged(self, eqn, ops):
        return [merged_axes(t, eqn.params["axes"]) for t in ops[0].interval]

    def interval(self, eqn, ops):
        axes, shape = eqn.params["axes"], eqn.out_avals[0].shape
        lo, hi = self.image(*self._merged(eqn, ops), eqn)
        return Interval(split_axes(lo, axes, shape), split_axes(hi, axes, shape))

    def backward(self, eqn, ops, lA, uA, alpha=None):
        axes, shape = eqn.params["axes"], eqn.in_avals[0].shape
        lower, upper = self.planes(*self._merged(eqn, ops), eqn)

        def pull(A, pos_plane, neg_plane):
            if A is None:
                return None, 0.0
            pos, neg = _pos_neg(merged_axes(A, axes, lead=1))
            (Ap, bp), (An, bn) = pos_plane.apply(pos), neg_plane.apply(neg)
            return split_axes(Ap + An, axes, shape, lead=1), _rowsum(bp + bn)

        lA, lbias = pull(lA, lower, upper)
        uA, ubias = pull(uA, upper, lower)
        return [(lA, uA)], lbias, ubias

    def forward(self, eqn, ops):
        axes, shape = eqn.params["axes"], eqn.out_avals[0].shape
        lower, upper = self.planes(*self._merged(eqn, ops), eqn)
        x = ops[0].linear
        xlw, xuw = merged_axes(x.lw, axes, lead=1), merged_axes(x.uw, axes, lead=1)
        xlb, xub = merged_axes(x.lb, axes), merged_axes(x.ub, axes)

        def push(plane, w_pos, w_neg, b_pos, b_neg):
            jp, jn = _pos_neg(plane.matrix())
            mat = lambda J, t: jnp.einsum("...kj,...j->...k", J, t)
            return mat(jp, w_pos) + mat(jn, w_neg), mat(jp, b_pos) + mat(jn, b_neg) + plane.bias

        lw, lb = push(lower, xlw, xuw, xlb, xub)
        uw, ub = push(upper, xuw, xlw, xub, xlb)
        out = lambda t, lead=0: split_axes(t, axes, shape, lead)
        return LinearBounds(out(lw, 1), out(lb), out(uw, 1), out(ub))


class Softmax(VectorRule):
    """``softmax_p`` with a perturbed input."""

    def image(self, l, u, eqn):
        lo, hi = log_bounds(l, u)
        return jnp.exp(lo), jnp.exp(hi)

    def planes(self, l, u, eqn):
        return softmax_planes(l, u)


register(Softmax(), softmax_p)
