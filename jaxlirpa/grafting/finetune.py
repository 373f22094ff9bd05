"""Fine-tuning after grafting, and grafting in rounds.

The paper fine-tunes a grafted network with the FAT loss and SGD (momentum 0.9)
under a cosine schedule, with two parameter groups: the grafted slopes and
intercepts (learning rate 0.01, no weight decay) and every other weight
(learning rate 0.001, weight decay 5e-4). :func:`finetune_optimizer` is that
optimizer as one ``optax.multi_transform``.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxlirpa.grafting.activation import INTERCEPT, SLOPE, get_masks, with_masks
from jaxlirpa.grafting.fat import fat_train
from jaxlirpa.grafting.scores import significance_scores, unstable_scores
from jaxlirpa.grafting.selection import gamma_schedule, grafting_priority, select_neurons
from jaxlirpa.sets import LinfBall


def _groups(params):
    """``"graft"`` for the grafted lines' slopes and intercepts, ``"weights"`` for the rest."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: "graft" if k[-1] in (SLOPE, INTERCEPT) else "weights" for k in flat})


def finetune_optimizer(total_steps: int, *, graft_lr: float = 0.01, lr: float = 0.001,
                       weight_decay: float = 5e-4, momentum: float = 0.9) -> optax.GradientTransformation:
    """SGD with momentum and cosine decay over ``total_steps``, ``graft_lr`` and no weight
    decay for the grafted slopes and intercepts, ``lr`` and ``weight_decay`` for the rest.

    Example: ``opt = finetune_optimizer(epochs * (len(x) // 128))``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    sgd = lambda rate: optax.sgd(optax.cosine_decay_schedule(rate, total_steps), momentum=momentum)  # noqa: E731
    return optax.multi_transform(
        {"graft": sgd(graft_lr), "weights": optax.chain(optax.add_decayed_weights(weight_decay), sgd(lr))}, _groups)


def finetune(model: nn.Module, variables, x, y, eps, *, epochs: int, batch_size: int = 128, key=None,
             graft_lr: float = 0.01, lr: float = 0.001, weight_decay: float = 5e-4, **fat_kwargs):
    """Fine-tune a grafted network: :func:`fat_train` with :func:`finetune_optimizer`.
    ``fat_kwargs`` go to :func:`fat_train` (``grad_align``, ``lower``, ``upper``, ``log``).

    Example: ``variables = finetune(model, grafted, x, y, 0.1, epochs=10)``.
    """
    steps = max(epochs * (len(x) // batch_size), 1)
    optimizer = finetune_optimizer(steps, graft_lr=graft_lr, lr=lr, weight_decay=weight_decay)
    return fat_train(model, variables, x, y, eps, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                     key=key, **fat_kwargs)


def graft(model: nn.Module, variables, x, y, eps_or_set, fraction: float, *, rounds: int = 1,
          gamma: float | None = None, significance: str = "activation", score_examples: int = 200,
          score_method: str = "crown", finetune_epochs: int = 5,
          progress: Callable[[str], None] | None = None, **finetune_kwargs):
    """Graft ``fraction`` of all neurons in ``rounds`` rounds, fine-tuning after each.

    Round ``t`` scores the current network on the first ``score_examples`` of ``x``
    (``r_u`` by ``score_method`` under ``eps_or_set``, ``r_s`` of kind
    ``significance``), grafts up to ``fraction * (t + 1) / rounds`` of the neurons by
    the priority ``gamma * r_u - r_s`` (``gamma`` fixed, or by default
    :func:`gamma_schedule` from 2 to 0), then fine-tunes for ``finetune_epochs``.
    ``eps_or_set`` is a radius or a ``jaxlirpa.LinfBall``, whose radius and domain
    the fine-tuning's FAT uses too; ``finetune_kwargs`` go to :func:`finetune`.

    Returns the grafted, fine-tuned variables. Example::

        grafted = graft(model, variables, x, y, jaxlirpa.LinfBall(0.1, 0., 1.), 0.5, finetune_epochs=10)
    """
    if isinstance(eps_or_set, LinfBall):
        eps = eps_or_set.eps
        finetune_kwargs = {"lower": eps_or_set.lower, "upper": eps_or_set.upper, **finetune_kwargs}
    elif isinstance(eps_or_set, (int, float)) and not isinstance(eps_or_set, bool):
        eps = eps_or_set
    else:
        raise TypeError(f"graft fine-tunes with L-inf FAT: give a radius or a jaxlirpa.LinfBall, "
                        f"not {type(eps_or_set).__name__}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    gammas = [gamma] * rounds if gamma is not None else gamma_schedule(rounds)
    xs, ys = x[:score_examples], y[:score_examples]
    for t, g in enumerate(gammas):
        r_s = significance_scores(model, variables, xs, ys, kind=significance)
        r_u = (unstable_scores(model, variables, xs, eps_or_set, method=score_method) if g
               else {k: jnp.zeros_like(v) for k, v in r_s.items()})  # gamma 0: significance only, no bounds
        priority = grafting_priority(r_u, r_s, g)
        masks = select_neurons(priority, fraction * (t + 1) / rounds, current=get_masks(variables))
        variables = with_masks(variables, masks)
        if progress is not None:
            grafted = sum(float(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
            progress(f"round {t + 1}/{rounds}: gamma {g:g}, {grafted:.1%} of the neurons grafted")
        variables = finetune(model, variables, x, y, eps, epochs=finetune_epochs, **finetune_kwargs)
    return variables


__all__ = ["finetune", "finetune_optimizer", "graft"]
