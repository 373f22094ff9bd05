"""Batched adversarial attacks (PGD, FGSM) in pure JAX.

An attack's value is a lower bound on the worst case that a verifier bounds
from above: a counterexample found here shows a property is false, and the gap
between the two shows how loose the certified bound can be at most. They also
supply the adversarial points used by certified (e.g. PGD/IBP mixed) training.

Everything is written with ``jax.numpy`` and ``lax`` loops and never syncs
with the host, so each function can be traced inside ``jax.jit``, ``vmap`` or
a training step. They are not jitted themselves: an objective usually closes
over parameters, and jitting on it as a static argument would recompile and
bake those parameters in as constants. Jit the caller instead::

    attack = jax.jit(lambda params, x, y: pgd_loss(
        lambda z: model.apply(params, z), x, y, eps=8 / 255))

Axis 0 of ``x`` is the batch; examples are attacked independently. An
``objective`` maps a batch to one value per example (shape ``(batch,)``) and
is maximised. Returned points carry no gradient (``lax.stop_gradient``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

Array = jax.Array
Objective = Callable[[Array], Array]

__all__ = ["project", "pgd", "pgd_loss", "fgsm", "margin_objective"]


def _norm_kind(norm) -> str:
    if norm in ("inf", "linf") or (isinstance(norm, float) and math.isinf(norm)):
        return "inf"
    if norm in (2, "2", "l2"):
        return "2"
    raise ValueError(f"norm must be 'inf' (np.inf) or 2, got {norm!r}")


def _per_example(a, x: Array) -> Array:
    """``a`` (scalar or one value per example) shaped ``(batch, 1, ..., 1)``."""
    a = jnp.broadcast_to(jnp.ravel(jnp.asarray(a, x.dtype)), (x.shape[0],))
    return a.reshape((-1,) + (1,) * (x.ndim - 1))


def _l2(v: Array) -> Array:
    """Per-example L2 norm shaped ``(batch, 1, ..., 1)``."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def project(z, x, eps, *, norm="inf", lower=None, upper=None) -> Array:
    """Project ``z`` onto the ``norm``-ball of radius ``eps`` around ``x``, then
    clip it to the domain ``[lower, upper]``.

    For L-inf, ``eps`` broadcasts against ``x`` (per example, per feature, or
    both). For L2 it is one radius per example (scalar or ``(batch,)``) and
    norms run over all non-batch axes. Clipping to a domain that contains
    ``x`` never leaves the ball, so the result lies in the intersection.

    Example::

        z = project(x + 0.3, x, 0.1, lower=0.0, upper=1.0)
    """
    x = jnp.asarray(x)
    z = jnp.asarray(z, x.dtype)
    if _norm_kind(norm) == "inf":
        eps = jnp.asarray(eps, x.dtype)
        z = jnp.clip(z, x - eps, x + eps)
    else:
        delta = z - x
        radius = _per_example(eps, x)
        norm_ = _l2(delta)
        scale = jnp.minimum(1.0, radius / jnp.maximum(norm_, jnp.finfo(x.dtype).tiny))
        z = x + delta * scale
    if lower is not None or upper is not None:
        z = jnp.clip(z, lower, upper)
    return z


def _random_start(key, x: Array, eps, kind: str) -> Array:
    """A point drawn uniformly from the L-inf box or the L2 ball around ``x``."""
    if kind == "inf":
        u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        return x + u * jnp.asarray(eps, x.dtype)
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / jnp.maximum(_l2(direction), jnp.finfo(x.dtype).tiny)
    dim = math.prod(x.shape[1:])
    u = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return x + direction * _per_example(eps, x) * u ** (1.0 / dim)


def _values_and_grads(objective: Objective, z: Array) -> tuple[Array, Array]:
    def total(z):
        values = objective(z)
        if values.shape != (z.shape[0],):
            raise ValueError(
                f"objective must return shape ({z.shape[0]},) (one value per example), "
                f"got {values.shape}")
        return jnp.sum(values), values

    (_, values), grads = jax.value_and_grad(total, has_aux=True)(z)
    return values, grads


def _keep_best(best, values: Array, z: Array):
    best_values, best_z = best
    better = values > best_values
    mask = better.reshape((-1,) + (1,) * (z.ndim - 1))
    return jnp.where(better, values, best_values), jnp.where(mask, z, best_z)


def _ascent(g: Array, kind: str) -> Array:
    """The steepest-ascent direction of unit ``kind``-norm: sign(g), or g / |g|_2 per example."""
    if kind == "inf":
        return jnp.sign(g)
    return g / jnp.maximum(_l2(g), jnp.finfo(g.dtype).tiny)


def pgd(objective: Objective, x, eps, *, norm="inf", steps: int = 10, step_size=None,
        restarts: int = 1, random_start: bool = True, lower=None, upper=None,
        key=None) -> Array:
    """Projected gradient ascent on ``objective`` inside the ``norm``-ball of
    radius ``eps`` around ``x`` (intersected with ``[lower, upper]``).

    L-inf takes signed-gradient steps, L2 takes steps along the per-example
    normalised gradient; ``step_size`` defaults to ``2.5 * eps / steps``
    (Madry et al.). Each of ``restarts`` runs starts uniformly at random in the
    set (or at ``x`` when ``random_start=False``). The objective is evaluated
    at every iterate and, per example, the best point over all iterates and
    restarts is returned; the clean point ``x`` (clipped to the domain) is a
    candidate too, so the result is never worse than ``x``.

    Args:
      objective: batch -> ``(batch,)`` values to maximise.
      x: clean batch, axis 0 the batch.
      eps: radius; see :func:`project` for the accepted shapes.
      norm: ``"inf"`` / ``np.inf`` or ``2``.
      steps, restarts: static loop lengths.
      key: PRNG key for the random starts (default ``jax.random.key(0)``).

    Example::

        x_adv = pgd(lambda z: model(z)[:, 3], x, eps=0.1, steps=20, restarts=4)
    """
    kind = _norm_kind(norm)
    x = jnp.asarray(x)
    eps = jnp.asarray(eps, x.dtype)
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    step = jnp.asarray(step_size, x.dtype) if kind == "inf" else _per_example(step_size, x)
    if key is None:
        key = jax.random.key(0)

    def proj(z):
        return project(z, x, eps, norm=kind, lower=lower, upper=upper)

    def pgd_step(carry, _):
        z, best = carry
        values, grads = _values_and_grads(objective, z)
        best = _keep_best(best, values, z)
        return (proj(z + step * _ascent(grads, kind)), best), None

    def restart(best, restart_key):
        z = proj(_random_start(restart_key, x, eps, kind)) if random_start else proj(x)
        (z, best), _ = lax.scan(pgd_step, (z, best), None, length=steps)
        return _keep_best(best, objective(z), z), None

    x0 = proj(x)
    best = (objective(x0), x0)
    (_, x_adv), _ = lax.scan(restart, best, jax.random.split(key, restarts))
    return lax.stop_gradient(x_adv)


def pgd_loss(apply_fn: Callable[[Array], Array], x, labels, eps, **kw) -> Array:
    """PGD maximising the per-example cross-entropy of ``apply_fn(x)`` logits
    against integer ``labels``; the usual attack for adversarial training.
    Keyword arguments go to :func:`pgd`.

    Example::

        x_adv = pgd_loss(lambda z: model.apply(params, z), x, y, eps=8 / 255,
                         steps=10, lower=0.0, upper=1.0)
    """

    def objective(z):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(z), labels)

    return pgd(objective, x, eps, **kw)


def fgsm(objective: Objective, x, eps, *, norm="inf", random_start: bool = True, alpha=None,
         lower=None, upper=None, key=None) -> Array:
    """One steepest-ascent step on ``objective`` in the ``norm``-ball (signed gradient
    for L-inf, normalised gradient for L2), from a uniform random start: the cheap
    attack of "Fast is better than free" (Wong et al., 2020) for fast adversarial
    training. ``alpha`` defaults to ``1.25 * eps``; with ``random_start=False``
    this is classic FGSM (or its L2 form, the fast gradient method).

    Example::

        x_adv = fgsm(objective, x, eps=8 / 255, key=jax.random.key(step))
        x_adv = fgsm(objective, x, eps=0.5, norm=2, key=jax.random.key(step))
    """
    kind = _norm_kind(norm)
    x = jnp.asarray(x)
    eps = jnp.asarray(eps, x.dtype)
    alpha = 1.25 * eps if alpha is None else jnp.asarray(alpha, x.dtype)
    if kind == "2":
        alpha = _per_example(alpha, x)
    if key is None:
        key = jax.random.key(0)
    proj = lambda z: project(z, x, eps, norm=kind, lower=lower, upper=upper)
    z = proj(_random_start(key, x, eps, kind) if random_start else x)
    _, grads = _values_and_grads(objective, z)
    return lax.stop_gradient(proj(z + alpha * _ascent(grads, kind)))


def fgsm_loss(apply_fn: Callable[[Array], Array], x, labels, eps, **kw) -> Array:
    """:func:`fgsm` on the per-example cross-entropy of ``apply_fn(x)`` against
    integer ``labels``: the attack of fast adversarial training. Keyword
    arguments go to :func:`fgsm`.

    Example::

        x_adv = fgsm_loss(lambda z: model.apply(params, z), x, y, eps=0.1, key=key, lower=0.0, upper=1.0)
    """
    return fgsm(lambda z: optax.softmax_cross_entropy_with_integer_labels(apply_fn(z), labels), x, eps, **kw)


def margin_objective(apply_fn: Callable[[Array], Array], labels) -> Objective:
    """Objective ``max_{j != y} logit_j - logit_y`` per example: positive
    exactly when the example is misclassified, so maximising it with
    :func:`pgd` searches for counterexamples to a robustness property whose
    certified lower bound is the negated margin.

    Example::

        x_adv = pgd(margin_objective(model, y), x, eps=0.05, restarts=5)
        found = margin_objective(model, y)(x_adv) > 0
    """
    labels = jnp.asarray(labels)

    def objective(z):
        logits = apply_fn(z)
        is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
        true = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
        other = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
        return other - true

    return objective
