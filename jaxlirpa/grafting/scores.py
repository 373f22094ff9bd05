"""Per-neuron scores that decide which ReLUs to graft (Chen et al. 2022, Sec. 3).

- unstable score ``r_u``: the fraction of inputs on which a neuron's pre-activation
  bounds over the eps-ball cross 0 (``l < 0 < u``), from any jaxlirpa method;
- significance score ``r_s``: the mean ``|activation|`` (magnitude) or the mean
  ``|d loss / d activation|`` (gradient) over inputs, divided by its largest
  value over all neurons of the network.

Both lie in [0, 1]. Pre-activation bounds come from the public API: one
``jaxlirpa.bound`` of the function returning every :class:`GraftedReLU`'s input
(each module sows it); a pytree of outputs shares the intermediate bounds, so
this costs one bound computation, not one per layer. Scores and masks are dicts
keyed by the activation's module path, in the order the model calls them.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

import jaxlirpa
from jaxlirpa.grafting.activation import get_masks


def _sown(model: nn.Module, variables, x, leaf: str) -> dict[str, jax.Array]:
    _, state = model.apply(variables, x, mutable=["intermediates"])
    found = {}
    for path, values in traverse_util.flatten_dict(state.get("intermediates", {})).items():
        if path[-1] == leaf:
            if len(values) != 1:
                raise ValueError(f"the GraftedReLU at {'/'.join(path[:-1])!r} runs {len(values)} times per call; "
                                 f"use one module per activation layer.")
            found["/".join(path[:-1])] = values[0]
    if not found:
        raise ValueError("the model has no GraftedReLU (nothing was sown under 'intermediates').")
    return found


def _layer_names(model: nn.Module, variables, x) -> list[str]:
    """The :class:`GraftedReLU` paths in call order (a pytree round trip would sort them)."""
    names = []

    def record(z):
        names.extend(_sown(model, variables, z, "preactivation"))
        return z

    jax.eval_shape(record, jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
    return names


def preactivations(model: nn.Module, variables, x) -> dict[str, jax.Array]:
    """The input of every :class:`GraftedReLU` on the batch ``x``, in call order.

    Example: ``{k: v.shape for k, v in preactivations(model, variables, x).items()}``.
    """
    return _sown(model, variables, x, "preactivation")


def activations(model: nn.Module, variables, x) -> dict[str, jax.Array]:
    """The output of every :class:`GraftedReLU` on the batch ``x``, in call order.

    Example: ``{k: float(abs(a).mean()) for k, a in activations(model, variables, x).items()}``.
    """
    return _sown(model, variables, x, "activation")


def preactivation_bounds(model: nn.Module, variables, x, eps_or_set, *, method: str = "crown",
                         **bound_kwargs) -> dict[str, jaxlirpa.Bounds]:
    """Sound bounds on every :class:`GraftedReLU`'s input over the set around each example.

    ``bound_kwargs`` go to :func:`jaxlirpa.bound` (``batch_size``, ``alpha``).
    Example::

        b = preactivation_bounds(model, variables, x, jaxlirpa.LinfBall(0.1, 0., 1.), method="ibp")
        b["relu1"].lower.shape   # (batch, 14, 14, 16)
    """
    b = jaxlirpa.bound(lambda z: preactivations(model, variables, z), x, eps_or_set, method=method, **bound_kwargs)
    return {layer: jaxlirpa.Bounds(b.lower[layer], b.upper[layer]) for layer in _layer_names(model, variables, x)}


def unstable_neurons(model: nn.Module, variables, x, eps_or_set, *, method: str = "crown",
                     **bound_kwargs) -> dict[str, jax.Array]:
    """Per example and layer, which ReLUs are unstable (``l < 0 < u``): shape
    ``(batch, *neurons)``. Grafted neurons are linear, hence never unstable.

    Example: ``sum(u.sum() for u in unstable_neurons(model, variables, x, 0.1).values())``.
    """
    masks = get_masks(variables)
    bounds = preactivation_bounds(model, variables, x, eps_or_set, method=method, **bound_kwargs)
    return {k: (b.lower < 0) & (b.upper > 0) & (masks[k] == 0) for k, b in bounds.items()}


def _mean_over(x, batch_size: int, per_batch: Callable) -> dict[str, jax.Array]:
    """The mean over all examples of ``per_batch(start, stop)``'s per-example values,
    one batch at a time (a batch's activations and gradients are as large as the net)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    total = None
    for start in range(0, len(x), batch_size):
        part = {k: jnp.sum(v, axis=0, dtype=jnp.float32) for k, v in per_batch(start, start + batch_size).items()}
        total = part if total is None else {k: total[k] + part[k] for k in total}
    return {k: v / len(x) for k, v in total.items()}


def unstable_scores(model: nn.Module, variables, x, eps_or_set, *, method: str = "crown",
                    batch_size: int | None = 10, **bound_kwargs) -> dict[str, jax.Array]:
    """``r_u``: per neuron, the fraction of the examples ``x`` on which it is unstable.

    **Arguments:**
    - ``eps_or_set``: the target perturbation, e.g. ``jaxlirpa.LinfBall(0.1, 0., 1.)``.
    - ``method``: the bound method of the pre-activation bounds (``"ibp"``, ``"crown"``, ...).
    - ``batch_size``: examples bounded at a time (``jaxlirpa.bound``'s; CROWN's memory grows with it).

    Example: ``r_u = unstable_scores(model, variables, x_train[:1000], jaxlirpa.LinfBall(0.1, 0., 1.))``.
    """
    unstable = unstable_neurons(model, variables, x, eps_or_set, method=method, batch_size=batch_size, **bound_kwargs)
    return {k: jnp.mean(u, axis=0, dtype=jnp.float32) for k, u in unstable.items()}


def _activation_gradients(model: nn.Module, variables, x, labels) -> dict[str, jax.Array]:
    """``d sum(CE) / d activation`` per example, through flax's perturbation offsets."""
    shapes = activations(model, variables, x)
    zeros = traverse_util.unflatten_dict(
        {tuple(k.split("/")) + ("activation",): jnp.zeros_like(v) for k, v in shapes.items()})

    def loss(offsets):
        logits = model.apply({**variables, "perturbations": offsets}, x)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    grads = traverse_util.flatten_dict(jax.grad(loss)(zeros))
    return {k: grads[tuple(k.split("/")) + ("activation",)] for k in shapes}


def significance_scores(model: nn.Module, variables, x, labels=None, *, kind: str = "activation",
                        batch_size: int = 100) -> dict[str, jax.Array]:
    """``r_s``: per neuron, the mean ``|activation|`` (``kind="activation"``) or the mean
    ``|d CE / d activation|`` (``kind="gradient"``, needs ``labels``) over ``x``,
    divided by the largest value over all neurons (so the most significant is 1).

    Example: ``r_s = significance_scores(model, variables, x_train[:1000], y_train[:1000], kind="gradient")``.
    """
    if kind == "activation":
        magnitudes = jax.jit(lambda v, xb, yb: {k: jnp.abs(a) for k, a in activations(model, v, xb).items()})
    elif kind == "gradient":
        if labels is None:
            raise ValueError("significance_scores(kind='gradient') needs the labels of x.")
        magnitudes = jax.jit(lambda v, xb, yb: {
            k: jnp.abs(g) for k, g in _activation_gradients(model, v, xb, yb).items()})
    else:
        raise ValueError(f"kind must be 'activation' or 'gradient', got {kind!r}.")
    labels = jnp.zeros(len(x), jnp.int32) if labels is None else jnp.asarray(labels)
    mean = _mean_over(x, batch_size, lambda i, j: magnitudes(variables, jnp.asarray(x[i:j]), labels[i:j]))
    largest = jnp.max(jnp.stack([jnp.max(v) for v in mean.values()]))
    return {k: mean[k] / jnp.where(largest > 0, largest, 1.0) for k in _layer_names(model, variables, x)}


__all__ = ["activations", "preactivation_bounds", "preactivations", "significance_scores", "unstable_neurons",
           "unstable_scores"]
