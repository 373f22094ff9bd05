"""Certified-training losses: upper bounds on the worst-case cross-entropy over a set.

Each loss maps ``(apply_fn, x, labels, eps_or_set)`` to one value per example (as
optax's losses do; take ``.mean()``) that is at least the cross-entropy of
``apply_fn(x')`` for every ``x'`` in the set, so minimising it trains the
network to be provably robust. They are pure JAX: use them inside any jitted
flax/optax step, with traced ``eps`` and ``beta`` from schedules.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlirpa.api import bound, margin_spec
from jaxlirpa.sets import Box, L1Ball, L2Ball, Region, as_set

__all__ = ["robust_cross_entropy", "ibp_loss", "crown_ibp_loss", "fused_loss"]

ApplyFn = Callable[[jax.Array], jax.Array]


def check_weight(name: str, value):
    """``value``, checked to lie in ``[0, 1]`` unless traced."""
    if not isinstance(value, jax.core.Tracer) and not 0.0 <= float(np.asarray(value)) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {float(np.asarray(value))}.")
    return value


def _is_zero(beta) -> bool:
    """Whether ``beta`` is known to be 0 while tracing (a number, not a traced value)."""
    return not isinstance(beta, jax.core.Tracer) and float(np.asarray(beta)) == 0.0


def _check_labels(labels, x) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if labels.shape != (jnp.shape(x)[0],):
        raise ValueError(f"labels must have shape ({jnp.shape(x)[0]},) (one class per example), got {labels.shape}.")
    return labels


def _num_classes(apply_fn: ApplyFn, x) -> int:
    out = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
    if out.ndim != 2:
        raise ValueError(f"apply_fn must return logits of shape (batch, classes), got {out.shape}.")
    return out.shape[1]


def robust_cross_entropy(margin_lower: jax.Array) -> jax.Array:
    """Per example, ``log(1 + sum_j exp(-m_j))`` for lower bounds ``m_j`` on the margins
    ``logit_y - logit_j`` (``j != y``), shape ``(batch, classes - 1)``.

    Why: the cross-entropy ``log(1 + sum_j exp(-margin_j))`` decreases in every
    margin, so this is the cross-entropy of the worst logits the bounds allow: an
    upper bound on the loss over the whole set (the robust CE of Wong & Kolter 2018,
    Gowal et al. 2018). It equals the clean cross-entropy when the bounds are exact.

    Example::

        m = jaxlirpa.bound(model, x, 0.1, method="ibp", spec=jaxlirpa.margin_spec(y, 10)).lower
        loss = robust_cross_entropy(m).mean()
    """
    zero = jnp.zeros(margin_lower.shape[:-1] + (1,), margin_lower.dtype)
    return jax.nn.logsumexp(jnp.concatenate([zero, -margin_lower], axis=-1), axis=-1)


def _margin_lower(apply_fn: ApplyFn, x, labels, eps_or_set, method: str) -> jax.Array:
    spec = margin_spec(labels, _num_classes(apply_fn, x))
    return bound(apply_fn, x, eps_or_set, method=method, spec=spec).lower


def ibp_loss(apply_fn: ApplyFn, x, labels, eps_or_set) -> jax.Array:
    """Robust cross-entropy on IBP margin bounds (Gowal et al. 2018), per example.

    The margins go through IBP with the spec fused into the last linear layer, the
    tightest IBP form and the cheapest certified loss (about two forward passes).

    **Arguments:**
    - ``apply_fn``: a batch of inputs to logits ``(batch, classes)``, e.g.
      ``lambda z: model.apply({"params": params}, z)``.
    - ``x``, ``labels``: the batch and its integer classes.
    - ``eps_or_set``: as in :func:`jaxlirpa.bound`, e.g. ``LinfBall(eps, 0.0, 1.0)``.

    Example::

        grads = jax.grad(lambda p: ibp_loss(lambda z: model.apply(p, z), x, y, 0.1).mean())(params)
    """
    labels = _check_labels(labels, x)
    return robust_cross_entropy(_margin_lower(apply_fn, x, labels, eps_or_set, "ibp"))


def crown_ibp_loss(apply_fn: ApplyFn, x, labels, eps_or_set, beta=1.0) -> jax.Array:
    """Robust cross-entropy on ``beta * CROWN-IBP + (1 - beta) * IBP`` margin bounds
    (Zhang et al. 2020), per example.

    Both are lower bounds, so their convex combination is one too. CROWN-IBP's
    tighter bounds stabilise early training; ramping ``beta`` from 1 to 0 (see
    :func:`jaxlirpa.training.crown_ibp_beta`) ends on IBP, which verifies best
    on an IBP-trained net. A concrete ``beta = 0`` skips the CROWN-IBP pass (one
    backward pass per margin row); :func:`make_train_step` passes it once the
    scheduled beta reaches 0.

    **Arguments:** as :func:`ibp_loss`, and ``beta`` in ``[0, 1]`` (may be traced).

    Example::

        loss = crown_ibp_loss(lambda z: model.apply(p, z), x, y, LinfBall(0.1, 0.0, 1.0), beta=0.5).mean()
    """
    labels = _check_labels(labels, x)
    beta = check_weight("beta", beta)
    lower = _margin_lower(apply_fn, x, labels, eps_or_set, "ibp")
    if not _is_zero(beta):
        lower = beta * _margin_lower(apply_fn, x, labels, eps_or_set, "crown-ibp") + (1 - beta) * lower
    return robust_cross_entropy(lower)


def _one_example_set(region: Region):
    """A set :func:`bound` accepts, equal to one example's ``region`` (batch axis of 1)."""
    lo, hi = region.lo[None], region.hi[None]
    if region.p == np.inf:
        return Box(lo, hi)  # an L-inf ball met with the domain is this box
    return {2.0: L2Ball, 1.0: L1Ball}[region.p](region.eps[None], lower=lo, upper=hi)


def fused_loss(apply_fn: ApplyFn, x, labels, eps_or_set, beta=1.0) -> jax.Array:
    """An upper bound on the worst-case cross-entropy found by bounding the loss
    itself ("loss fusion", Xu et al. 2020), per example.

    Instead of bounding all ``classes - 1`` margins, this bounds the scalar
    ``S(x') = sum_{j != y} exp(logit_j(x') - logit_y(x') - s)`` from above, with
    ``beta * CROWN-IBP + (1 - beta) * IBP`` as in :func:`crown_ibp_loss`, and returns
    ``s + log(exp(-s) + upper(S)) >= CE``. CROWN-IBP then needs one backward pass
    per example whatever the number of classes. The shift ``s`` (a per-example
    constant: the IBP bound on ``max_j logit_j - logit_y``) keeps ``exp`` from
    overflowing; the relaxations of ``exp`` scale with ``exp(-s)``, so the bound
    does not depend on it. The price: the margins ``logit_j - logit_y`` get IBP
    intervals without the last layer fused in, so the bound is looser than
    :func:`crown_ibp_loss` while the network is far from robust.

    **Arguments:** as :func:`crown_ibp_loss`.

    Example::

        loss = fused_loss(lambda z: model.apply(p, z), x, y, LinfBall(0.1, 0.0, 1.0), beta=1.0).mean()
    """
    labels = _check_labels(labels, x)
    beta = check_weight("beta", beta)
    num_classes = _num_classes(apply_fn, x)
    region = as_set(eps_or_set).region(jnp.asarray(x))
    logits = bound(apply_fn, x, eps_or_set, method="ibp")
    true_lower = jnp.take_along_axis(logits.lower, labels[:, None], axis=1)
    shift = lax.stop_gradient(jnp.max(logits.upper - true_lower, axis=1))

    def exp_sum_upper(method: str) -> jax.Array:
        def one(region_i: Region, label, shift_i):
            onehot = jax.nn.one_hot(label, num_classes, dtype=region_i.center.dtype)

            def others_exp(z):
                logits = apply_fn(z)
                gaps = logits - jnp.sum(logits * onehot, axis=-1, keepdims=True) - shift_i
                return jnp.sum(jnp.exp(gaps) * (1 - onehot), axis=-1, keepdims=True)

            return bound(others_exp, region_i.center[None], _one_example_set(region_i), method=method).upper[0, 0]

        return jax.vmap(one)(region, labels, shift)

    upper = exp_sum_upper("ibp")
    if not _is_zero(beta):
        upper = beta * exp_sum_upper("crown-ibp") + (1 - beta) * upper
    tiny = jnp.finfo(upper.dtype).tiny  # raising an upper bound keeps it sound; log(0) would not
    return shift + jnp.log(jnp.maximum(jnp.exp(-shift) + upper, tiny))
