"""Which neurons to graft: rank by a priority, take a global fraction.

The paper's priority is ``gamma * r_u - r_s``: unstable neurons (high ``r_u``) of
little significance (low ``r_s``) are grafted first. ``gamma`` is a constant, or
decays from 2 to 0 over successive selection rounds (:func:`gamma_schedule`): the
first rounds remove the neurons that hurt certification most, the last ones those
that matter least for accuracy. The baselines of the paper's Table 1 are other
priorities given to the same :func:`select_neurons`:

- random grafting: :func:`random_priority`;
- magnitude only (SAP-like): ``grafting_priority(r_u, r_s, 0.0)`` with ``r_s`` of ``kind="activation"``;
- gradient only (GAP-like): the same with ``r_s`` of ``kind="gradient"``.

Every function here is jit-traceable; priorities and masks are dicts keyed by layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def grafting_priority(unstable: dict[str, jax.Array], significance: dict[str, jax.Array],
                      gamma: float) -> dict[str, jax.Array]:
    """``gamma * r_u - r_s`` per neuron; higher is grafted first.

    Example: ``select_neurons(grafting_priority(r_u, r_s, 2.0), 0.5)``.
    """
    if unstable.keys() != significance.keys():
        raise ValueError(f"scores of different layers: {list(unstable)} vs {list(significance)}.")
    return {k: gamma * unstable[k] - significance[k] for k in unstable}


def random_priority(key, like: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Uniform random priorities shaped like ``like``: random grafting.

    Example: ``select_neurons(random_priority(jax.random.key(0), r_u), 0.5)``.
    """
    keys = jax.random.split(key, len(like))
    return {k: jax.random.uniform(sub, jnp.shape(v)) for sub, (k, v) in zip(keys, like.items())}


def gamma_schedule(rounds: int, start: float = 2.0, end: float = 0.0) -> list[float]:
    """``gamma`` of each of ``rounds`` selection rounds, decaying linearly from
    ``start`` to ``end`` (one round: ``start``).

    Example: ``gamma_schedule(3)`` is ``[2.0, 1.0, 0.0]``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    return [float(g) for g in np.linspace(start, end, rounds)] if rounds > 1 else [float(start)]


def select_neurons(priority: dict[str, jax.Array], fraction: float,
                   current: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """0/1 masks grafting the ``fraction`` of all neurons (over every layer together)
    with the highest priority. Neurons already grafted in ``current`` stay grafted
    and count towards the fraction (when they exceed it, the result is ``current``).

    **Arguments:**
    - ``priority``: per layer, one value per neuron (see :func:`grafting_priority`).
    - ``fraction``: in [0, 1], e.g. 0.3, 0.5 or 0.8 as in the paper.
    - ``current``: masks of an earlier round, for progressive grafting.

    Example::

        masks = select_neurons(grafting_priority(r_u, r_s, 2.0), 0.5)
        variables = with_masks(variables, masks)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
    if current is not None and current.keys() != priority.keys():
        raise ValueError(f"current masks cover {list(current)}, priorities {list(priority)}.")
    flat = jnp.concatenate([jnp.ravel(p) for p in priority.values()]).astype(jnp.float32)
    if current is not None:
        kept = jnp.concatenate([jnp.ravel(m) for m in current.values()]) > 0
        flat = jnp.where(kept, jnp.inf, flat)
    count = int(round(fraction * flat.size))
    _, chosen = jax.lax.top_k(flat, count)
    mask = jnp.zeros(flat.shape, jnp.float32).at[chosen].set(1.0)
    if current is not None:
        mask = jnp.maximum(mask, kept.astype(jnp.float32))
    sizes = np.cumsum([np.size(p) for p in priority.values()])[:-1]
    return {k: m.reshape(jnp.shape(p)) for (k, p), m in zip(priority.items(), jnp.split(mask, sizes))}


__all__ = ["gamma_schedule", "grafting_priority", "random_priority", "select_neurons"]
