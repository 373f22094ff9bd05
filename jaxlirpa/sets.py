"""Perturbation sets: where an input (or parameter) may move.

A user-facing set (``LinfBall``, ``L2Ball``, ``L1Ball``, ``Box``) is placed
around a centre ``x`` by :meth:`region`, giving a :class:`Region`: a pytree of
arrays shaped like ``x`` that knows its elementwise interval and how to
*concretise* a linear function over itself, ``min/max <A, x'> for x' in set``
(the dual-norm step of every LiRPA method).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np



def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _check_radius(eps, name="eps"):
    eps = jnp.asarray(eps) if not isinstance(eps, (jax.Array, np.ndarray)) else eps
    if not jnp.issubdtype(eps.dtype, jnp.floating) and not jnp.issubdtype(eps.dtype, jnp.integer):
        raise TypeError(f"{name} must be a real number or array, got dtype {eps.dtype}.")
    if _is_concrete(eps):
        e = np.asarray(eps)
        if not np.all(np.isfinite(e)):
            raise ValueError(f"{name} must be finite; got {e.ravel()[:5]}. Use a Box for unbounded inputs.")
        if np.any(e < 0):
            raise ValueError(f"{name} must be >= 0; got a minimum of {e.min()}. Pass the radius, not a signed offset.")
    return eps


def _broadcast(name, a, x):
    a = jnp.asarray(a, dtype=x.dtype)
    try:
        return jnp.broadcast_to(a, x.shape)
    except ValueError:
        raise ValueError(
            f"{name} has shape {a.shape}, which does not broadcast to the input shape {x.shape}. "
            f"Give a scalar, or an array broadcastable to x (batch axis first)."
        ) from None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Region:
    """A set placed around a centre: the box ``[lo, hi]`` intersected with the
    ball ``{c + eps * d : ||d||_p <= 1}`` (``p = inf`` means the box alone).

    All fields are arrays shaped like the centre, so a batch of regions is a
    leading axis that ``jax.vmap`` maps over.
    """

    center: jax.Array
    eps: jax.Array
    lo: jax.Array
    hi: jax.Array
    p: float = dataclasses.field(metadata=dict(static=True), default=np.inf)

    def interval(self) -> tuple[jax.Array, jax.Array]:
        """Elementwise lower and upper bounds of the set."""
        return self.lo, self.hi

    def concretize(self, A: jax.Array, sign: int) -> jax.Array:
        """``sign * max_x sign * <A_r, x>`` for every row ``r`` of ``A`` (shape (rows, *x)).

        sign=-1 gives the minimum (lower bound), +1 the maximum.
        """
        # Matrix-vector products: the sums of A * x made XLA:CPU write x out broadcast to A.
        A = A.reshape(A.shape[0], -1)
        dot = lambda x: A @ x.reshape(-1)  # noqa: E731
        box = dot((self.hi + self.lo) / 2) + sign * (jnp.abs(A) @ ((self.hi - self.lo) / 2).reshape(-1))
        if self.p == np.inf:
            return box
        scaled = A * self.eps.reshape(-1)
        dual = {2.0: lambda s: jnp.sqrt(jnp.sum(s * s, 1)),
                1.0: lambda s: jnp.max(jnp.abs(s), 1)}[self.p](scaled)
        ball = dot(self.center) + sign * dual
        # Both are valid over the intersection; the tighter one wins.
        return jnp.minimum(box, ball) if sign > 0 else jnp.maximum(box, ball)

    def contains(self, z, tol=1e-6):
        """Whether points ``z`` (shaped like the centre) lie in the set, up to ``tol``."""
        inside = jnp.all((z >= self.lo - tol) & (z <= self.hi + tol))
        if self.p == np.inf:
            return inside
        safe = jnp.where(self.eps > 0, self.eps, 1.0)
        d = jnp.where(self.eps > 0, (z - self.center) / safe, 0.0)
        norm = jnp.linalg.norm(d.ravel(), ord=self.p)
        return inside & (norm <= 1 + tol)


@dataclasses.dataclass(frozen=True)
class _Ball:
    eps: Any
    lower: Any = None
    upper: Any = None
    p = np.inf

    def region(self, x) -> Region:
        eps = _broadcast("eps", _check_radius(self.eps), x)
        lo, hi = x - eps, x + eps
        if self.lower is not None:
            lo = jnp.maximum(lo, _broadcast("lower", self.lower, x))
        if self.upper is not None:
            hi = jnp.minimum(hi, _broadcast("upper", self.upper, x))
        if _is_concrete(lo) and _is_concrete(hi) and np.any(np.asarray(lo) > np.asarray(hi)):
            raise ValueError("x lies outside the domain [lower, upper] by more than eps, so the set is empty; "
                             "clip x to the domain first.")
        return Region(center=x, eps=eps, lo=lo, hi=hi, p=self.p)


class LinfBall(_Ball):
    """L-infinity ball ``|x' - x|_inf <= eps``, optionally clipped to ``[lower, upper]``.

    ``eps`` may be a scalar or an array broadcastable to ``x`` (per example or per
    feature). Example: ``jaxlirpa.bound(f, x, jaxlirpa.LinfBall(0.1, lower=0., upper=1.))``.
    """

    p = np.inf


class L2Ball(_Ball):
    """L2 ball ``|(x' - x) / eps|_2 <= 1`` (eps per example or per feature: an ellipsoid),
    optionally clipped to ``[lower, upper]``. Example: ``jaxlirpa.L2Ball(0.5)``."""

    p = 2.0


class L1Ball(_Ball):
    """L1 ball ``|(x' - x) / eps|_1 <= 1``, optionally clipped to ``[lower, upper]``."""

    p = 1.0


@dataclasses.dataclass(frozen=True)
class Box:
    """Axis-aligned box ``lower <= x' <= upper`` (arrays broadcastable to ``x``).

    ``x`` then only fixes the shape. Example: ``jaxlirpa.Box(x - 0.1, x + 0.2)``.
    """

    lower: Any
    upper: Any

    def region(self, x) -> Region:
        lo, hi = _broadcast("Box.lower", self.lower, x), _broadcast("Box.upper", self.upper, x)
        if _is_concrete(lo) and _is_concrete(hi):
            if not (np.all(np.isfinite(np.asarray(lo))) and np.all(np.isfinite(np.asarray(hi)))):
                raise ValueError("Box bounds must be finite.")
            if np.any(np.asarray(lo) > np.asarray(hi)):
                raise ValueError("Box.lower must be <= Box.upper everywhere; swap them or fix the offending entries.")
        return Region(center=(lo + hi) / 2, eps=(hi - lo) / 2, lo=lo, hi=hi, p=np.inf)


PerturbationSet = LinfBall | L2Ball | L1Ball | Box


def as_set(eps_or_set) -> Any:
    """A number or array means an L-inf ball of that radius."""
    if isinstance(eps_or_set, (LinfBall, L2Ball, L1Ball, Box)):
        return eps_or_set
    if isinstance(eps_or_set, (int, float, np.ndarray, jax.Array, np.number)) and not isinstance(eps_or_set, bool):
        return LinfBall(eps_or_set)
    raise TypeError(
        f"Expected eps (a number or array) or a set (LinfBall, L2Ball, L1Ball, Box); got {type(eps_or_set).__name__}."
    )



def _is_set_leaf(s) -> bool:
    return s is None or isinstance(s, (LinfBall, L2Ball, L1Ball, Box, int, float, np.ndarray, jax.Array, np.number))


def sets_per_leaf(sets, tree) -> list:
    """The set of every leaf of ``tree`` (``None``: the leaf stays constant), in
    ``jax.tree_util.tree_leaves`` order. ``sets`` is one set (or radius) for all
    leaves, or a pytree of them matching a prefix of ``tree``'s structure, with
    ``None`` on subtrees that stay constant."""

    class Each:  # carries a set (possibly None) to every leaf below it
        def __init__(self, s):
            self.s = s

    try:
        per_leaf = jax.tree_util.tree_map(lambda s, sub: jax.tree_util.tree_map(lambda _: Each(s), sub),
                                          sets, tree, is_leaf=_is_set_leaf)
    except ValueError as err:
        raise ValueError(
            "eps_or_set must be one set or radius for every leaf, or a pytree of sets (None for leaves that stay "
            f"constant) shaped like a prefix of x's pytree; the structures differ: {err}"
        ) from None
    return [None if e.s is None else as_set(e.s) for e in jax.tree_util.tree_leaves(per_leaf, is_leaf=lambda e: isinstance(e, Each))]


def perturb_leaves(tree, eps_or_set, where) -> Any:
    """A pytree of sets for :func:`jaxlirpa.bound`: ``eps_or_set`` on the leaves of
    ``tree`` where ``where(path, leaf)`` is true, ``None`` (constant) elsewhere.
    ``path`` is the leaf's key path joined by ``/``, e.g. ``"params/Dense_0/kernel"``.

    Example: perturb only the kernels of a flax model by 0.01::

        sets = jaxlirpa.perturb_leaves(params, 0.01, lambda path, leaf: path.endswith("kernel"))
        jaxlirpa.bound(lambda p: model.apply(p, x), params, sets)
    """
    def pick(path, leaf):
        return eps_or_set if where(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) else None

    return jax.tree_util.tree_map_with_path(pick, tree)
