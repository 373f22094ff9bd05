"""Fast adversarial training (FAT): FGSM from a random start plus GradAlign.

The loss of Wong et al. (2020) and Andriushchenko & Flammarion (2020), as the
grafting paper trains its baselines and fine-tunes grafted networks:

    CE(f(x_adv), y) + lambda * (1 - cos(grad_x CE(f(x), y), grad_x CE(f(x + eta), y)))

with ``x_adv`` one FGSM step of ``1.25 * eps`` from a uniform start in the
eps-ball (``jaxlirpa.attacks.fgsm``), ``eta`` uniform in ``[-eps, eps]``, the
cosine taken per example over the input gradients (the first one held constant,
examples with a zero gradient left out, as the reference code does) and
``lambda = 0.2``. Every step is one jitted function with no host synchronisation.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlirpa.attacks import fgsm
from jaxlirpa.datasets import batches


def _cross_entropy(apply_fn, labels):
    return lambda z: optax.softmax_cross_entropy_with_integer_labels(apply_fn(z), labels)


def grad_align_penalty(apply_fn: Callable, x, labels, eps, key) -> jax.Array:
    """``mean(1 - cos(grad at x, grad at x + uniform noise))`` over the examples
    whose two input gradients are both non-zero (0 when there are none).

    Example: ``grad_align_penalty(lambda z: model.apply(v, z), x, y, 0.1, jax.random.key(0))``.
    """
    losses = _cross_entropy(apply_fn, labels)
    input_grad = jax.grad(lambda z: jnp.sum(losses(z)))
    noise = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    g_clean = jax.lax.stop_gradient(input_grad(x)).reshape(x.shape[0], -1)
    g_noisy = input_grad(x + noise).reshape(x.shape[0], -1)
    n_clean, n_noisy = jnp.linalg.norm(g_clean, axis=1), jnp.linalg.norm(g_noisy, axis=1)
    counted = (n_clean > 0) & (n_noisy > 0)
    cos = jnp.sum(g_clean * g_noisy, axis=1) / jnp.where(counted, n_clean * n_noisy, 1.0)
    return jnp.sum(jnp.where(counted, 1.0 - cos, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


def fat_loss(apply_fn: Callable, x, labels, eps, key, *, grad_align: float = 0.2,
             lower: float | None = 0.0, upper: float | None = 1.0) -> jax.Array:
    """The FAT loss of one batch: cross-entropy at the FGSM point plus ``grad_align``
    times :func:`grad_align_penalty` (skipped when ``grad_align == 0``).

    **Arguments:**
    - ``apply_fn``: logits of a batch (close over the parameters to differentiate).
    - ``eps``: L-inf radius; the FGSM step is ``1.25 * eps``.
    - ``lower``, ``upper``: the input domain the adversarial point is clipped to.

    Example::

        loss = fat_loss(lambda z: model.apply(variables, z), x, y, 0.1, jax.random.key(0))
    """
    attack_key, noise_key = jax.random.split(key)
    losses = _cross_entropy(apply_fn, labels)
    x_adv = fgsm(losses, x, eps, key=attack_key, lower=lower, upper=upper)
    loss = jnp.mean(losses(x_adv))
    if grad_align:
        loss = loss + grad_align * grad_align_penalty(apply_fn, x, labels, eps, noise_key)
    return loss


def make_fat_step(model: nn.Module, optimizer: optax.GradientTransformation, eps, *,
                  grad_align: float = 0.2, lower: float | None = 0.0, upper: float | None = 1.0):
    """A jitted ``step(variables, opt_state, x, y, key) -> (variables, opt_state, loss)``
    that updates ``variables["params"]`` by ``optimizer`` on :func:`fat_loss`; every
    other collection (the grafting masks) stays fixed.

    Example::

        step = make_fat_step(model, optax.adam(1e-3), 0.1)
        variables, state, loss = step(variables, optimizer.init(variables["params"]), x, y, key)
    """

    @jax.jit
    def step(variables, opt_state, x, labels, key):
        def loss_of(params):
            apply_fn = lambda z: model.apply({**variables, "params": params}, z)  # noqa: E731
            return fat_loss(apply_fn, x, labels, eps, key, grad_align=grad_align, lower=lower, upper=upper)

        loss, grads = jax.value_and_grad(loss_of)(variables["params"])
        updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

    return step


def fat_train(model: nn.Module, variables, x, y, eps, *, optimizer: optax.GradientTransformation,
              epochs: int, batch_size: int = 128, key=None, grad_align: float = 0.2,
              lower: float | None = 0.0, upper: float | None = 1.0,
              log: Callable[[int, float], None] | None = None):
    """Train ``variables["params"]`` with the FAT loss for ``epochs`` passes over ``(x, y)``.

    **Arguments:**
    - ``model``, ``variables``: a flax module and all of its variables (masks included).
    - ``optimizer``: any optax transformation; a schedule counts steps
      (``epochs * (len(x) // batch_size)`` in all).
    - ``key``: shuffles the data and draws the attacks' randomness.
    - ``log``: ``log(epoch, mean loss)`` after every epoch.

    Returns the trained variables. Example::

        variables = fat_train(CNNA(), variables, x, y, 0.1, optimizer=optax.adam(1e-3), epochs=5)
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}.")
    if len(x) < batch_size:
        raise ValueError(f"{len(x)} examples cannot fill one batch of {batch_size}; lower batch_size.")
    key = jax.random.key(0) if key is None else key
    step = make_fat_step(model, optimizer, eps, grad_align=grad_align, lower=lower, upper=upper)
    opt_state = optimizer.init(variables["params"])
    for epoch in range(epochs):
        key, order_key = jax.random.split(key)
        losses = []
        for k, (xb, yb) in enumerate(batches(x, y, batch_size, key=order_key)):
            variables, opt_state, loss = step(variables, opt_state, xb, yb, jax.random.fold_in(key, k))
            losses.append(loss)
        if log is not None:
            log(epoch, float(jnp.mean(jnp.stack(losses))))
    return variables


__all__ = ["fat_loss", "fat_train", "grad_align_penalty", "make_fat_step"]
