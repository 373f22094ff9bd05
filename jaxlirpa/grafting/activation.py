"""The grafted activation: a ReLU whose chosen neurons are replaced by learnable lines.

``GraftedReLU`` computes, per neuron,

    relu(x * (1 - m)) + (a * x + b) * m

with a fixed 0/1 mask ``m`` (collection ``"grafting"``, all zeros: a plain ReLU)
and learnable slope ``a`` (init 0.4) and intercept ``b`` (init 0), one per neuron
(per element of a feature map). For a binary mask this equals the paper's
``relu(x) * (1 - m) + (a * x + b) * m``, but the mask is applied *before* the
ReLU: a grafted neuron's ReLU input is the constant 0, so every bound method
sees it as a stable neuron with exact bounds ``[0, 0]``. It is never counted
unstable and a branch and bound over ReLU splits never picks it, with no special
case in the verifier; its output is the linear ``a * x + b``, bounded exactly by
the linear rules.

The module also records, only when asked (``mutable=["intermediates"]``), its
input and output under ``"intermediates"`` (``"preactivation"``, ``"activation"``),
and adds a ``"perturbations"/"activation"`` offset to its output when the
variables hold one, whose gradient is that of a loss w.r.t. the activation:
what the unstable and significance scores read.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MASKS = "grafting"
"""The flax collection that holds each :class:`GraftedReLU`'s mask."""
SLOPE, INTERCEPT = "graft_slope", "graft_intercept"
"""Parameter names of the grafted lines (``finetune_optimizer`` gives them their own learning rate)."""


class GraftedReLU(nn.Module):
    """``relu(x * (1 - m)) + (a * x + b) * m`` per neuron; a ReLU while ``m = 0``.

    **Arguments:**
    - ``slope_init``: initial slope ``a`` of every grafted line (the paper's 0.4).

    Example::

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(10)(GraftedReLU()(nn.Dense(64)(x)))

        variables = MLP().init(jax.random.key(0), x)      # {"params", "grafting"}
        y = MLP().apply(variables, x)                        # a plain ReLU net until masks are set
    """

    slope_init: float = 0.4

    @nn.compact
    def __call__(self, x):
        neurons = x.shape[1:]
        mask = self.variable(MASKS, "mask", jnp.zeros, neurons, x.dtype).value
        slope = self.param(SLOPE, nn.initializers.constant(self.slope_init), neurons, x.dtype)
        intercept = self.param(INTERCEPT, nn.initializers.zeros, neurons, x.dtype)
        self.sow("intermediates", "preactivation", x)
        y = jax.nn.relu(x * (1 - mask)) + (slope * x + intercept) * mask
        self.sow("intermediates", "activation", y)
        if self.is_initializing():  # no "perturbations" collection in the variables
            return y
        return self.perturb("activation", y)


def _layer(path: tuple) -> str:
    return "/".join(path[:-1])


def get_masks(variables) -> dict[str, jax.Array]:
    """Each :class:`GraftedReLU`'s mask, keyed by its module path (``"block1/relu2"``).

    Example: ``{k: float(m.mean()) for k, m in get_masks(variables).items()}`` (grafted fraction per layer).
    """
    if MASKS not in variables:
        raise ValueError(f"variables have no {MASKS!r} collection: the model has no GraftedReLU, "
                         f"or the variables were filtered (pass all of model.init's output).")
    return {_layer(path): m for path, m in traverse_util.flatten_dict(variables[MASKS]).items()}


def with_masks(variables, masks: dict[str, jax.Array]) -> dict:
    """``variables`` with the masks of the layers in ``masks`` replaced (others kept).

    Masks must be 0/1 and shaped like the layer's neurons; a value between 0 and 1
    would not be the grafted activation (the ReLU branch is masked before the ReLU).

    Example: ``grafted = with_masks(variables, select_neurons(priority, 0.5))``.
    """
    current = get_masks(variables)
    new = dict(current)
    for layer, mask in masks.items():
        if layer not in current:
            raise ValueError(f"no GraftedReLU at {layer!r}; layers: {', '.join(current)}.")
        if np.shape(mask) != current[layer].shape:
            raise ValueError(f"mask for {layer!r} has shape {np.shape(mask)}, expected {current[layer].shape}.")
        if not isinstance(mask, jax.core.Tracer) and not np.all(np.isin(np.asarray(mask), (0, 1))):
            raise ValueError(f"mask for {layer!r} must contain only 0 and 1.")
        new[layer] = jnp.asarray(mask, current[layer].dtype)
    tree = traverse_util.unflatten_dict({tuple(k.split("/")) + ("mask",): m for k, m in new.items()})
    return {**variables, MASKS: tree}
