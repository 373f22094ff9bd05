"""Normalisation as a whole: ``y = z * r`` with ``r = (mean(z^2) + eps)^(-1/2)`` over the
normalised axes (``normalize_p``, fused by ``jaxlirpa.patterns`` from layer norm, whose
centring ``z = x - mean(x)`` stays linear and exact, and from RMS norm).

On the box ``l <= z <= u`` (``K`` entries):

- **interval** (exact over the box): ``y_k = g(z_k, Q_k)`` with ``Q_k = sum_{j != k} z_j^2``
  and ``g(t, Q) = t / sqrt((t^2 + Q) / K + eps)``, increasing in ``t`` and, for ``t > 0``,
  decreasing in ``Q`` (increasing for ``t < 0``): each bound takes ``t`` at an end and ``Q_k``
  at the end of its range that helps;
- **planes** (mean-value form): with ``J(z) = r (I - y y^T / K)`` the Jacobian, ``z0`` the
  midpoint and ``w`` the half widths, ``y(z) - y(z0) - J(z0)(z - z0)`` lies within
  ``+-rho``, ``rho_k = sum_j max |J_kj(box) - J_kj(z0)| w_j``, where ``J(box)`` encloses ``J``
  over the box by interval arithmetic on ``r`` and on the interval ``y`` just found. Where the
  interval's constant line is better at ``z0`` (wide boxes, which let ``r`` grow large), the
  element takes it instead.

The planes are dense ``K x K`` matrices per normalised vector.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxlirpa.patterns import normalize_p
from jaxlirpa.rules.base import register
from jaxlirpa.rules.softmax import DensePlane, VectorRule


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
    corners = jnp.stack([al * bl, al * bu, au * bl, au * bu])
    return jnp.min(corners, 0), jnp.max(corners, 0)


def normalize_image(l, u, eps):
    """The exact range of ``z * rsqrt(mean(z^2) + eps)`` over the box (last axis)."""
    K = l.shape[-1]
    sq_lo, sq_hi = _squares(l, u)
    q_lo, q_hi = _sum_of_others(sq_lo), _sum_of_others(sq_hi)
    g = lambda t, q: t * lax.rsqrt((t * t + q) / K + eps)
    lo, hi = g(l, jnp.where(l >= 0, q_hi, q_lo)), g(u, jnp.where(u >= 0, q_lo, q_hi))
    bound = jnp.sqrt(jnp.asarray(K, lo.dtype))  # |y_k| <= sqrt(K) always: the range of an unbounded box
    return jnp.where(jnp.isnan(lo), -bound, jnp.clip(lo, -bound, bound)), jnp.where(jnp.isnan(hi), bound, jnp.clip(hi, -bound, bound))


def normalize_planes(l, u, eps) -> tuple[DensePlane, DensePlane]:
    K = l.shape[-1]
    y_lo, y_hi = normalize_image(l, u, eps)
    z0, w = (l + u) / 2, (u - l) / 2
    r0 = lax.rsqrt(jnp.mean(z0 * z0, -1, keepdims=True) + eps)
    y0 = z0 * r0
    eye = jnp.eye(K, dtype=l.dtype)
    J0 = r0[..., None] * (eye - y0[..., :, None] * y0[..., None, :] / K)

    sq_lo, sq_hi = _squares(l, u)
    r_lo = lax.rsqrt(jnp.mean(sq_hi, -1, keepdims=True) + eps)[..., None]
    r_hi = lax.rsqrt(jnp.mean(sq_lo, -1, keepdims=True) + eps)[..., None]
    p_lo, p_hi = _product(y_lo[..., :, None], y_hi[..., :, None], y_lo[..., None, :], y_hi[..., None, :])
    y_sq_lo, y_sq_hi = _squares(y_lo, y_hi)  # y_k * y_k: a square, not a product of two intervals
    p_lo = jnp.where(eye > 0, y_sq_lo[..., None], p_lo)
    p_hi = jnp.where(eye > 0, y_sq_hi[..., None], p_hi)
    m_lo, m_hi = eye - p_hi / K, eye - p_lo / K
    J_lo, J_hi = jnp.minimum(r_lo * m_lo, r_hi * m_lo), jnp.maximum(r_lo * m_hi, r_hi * m_hi)
    rho = jnp.einsum("...kj,...j->...k", jnp.maximum(J_hi - J0, J0 - J_lo), w)

    bias = y0 - jnp.einsum("...kj,...j->...k", J0, z0)
    use_lower, use_upper = y0 - rho > y_lo, y0 + rho < y_hi
    zero = jnp.zeros_like(J0)
    lower = DensePlane(jnp.where(use_lower[..., None], J0, zero), jnp.where(use_lower, bias - rho, y_lo))
    upper = DensePlane(jnp.where(use_upper[..., None], J0, zero), jnp.where(use_upper, bias + rho, y_hi))
    return lower, upper


class Normalize(VectorRule):
    """``normalize_p`` with a perturbed input."""

    def image(self, l, u, eqn):
        return normalize_image(l, u, eqn.params["eps"])

    def planes(self, l, u, eqn):
        return normalize_planes(l, u, eqn.params["eps"])


register(Normalize(), normalize_p)
