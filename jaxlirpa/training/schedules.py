"""Schedules for certified training, as optax schedules (``step -> value``, jit-traceable).

The linear ramp is optax's own: ``optax.linear_schedule(0.0, eps, ramp_steps, warmup_steps)``.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

__all__ = ["smoothed_schedule", "crown_ibp_beta"]

Schedule = Callable[[object], object]


def smoothed_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0,
                      *, mid_point: float = 0.25, exponent: float = 4.0) -> Schedule:
    """auto_LiRPA's ``SmoothedScheduler`` (after DeepMind's IBP code): ``init_value`` until
    ``transition_begin``, then a polynomial ``step ** exponent`` ramp for the first
    ``mid_point`` of ``transition_steps``, then linear to ``end_value``, reached at
    ``transition_begin + transition_steps`` and kept after. The slope is continuous at
    the switch.

    Why: a ramp that starts very slowly keeps the first steps at a tiny eps, where
    IBP bounds of a freshly trained net are still enormous; a linear ramp there can
    collapse training.

    **Arguments:** as ``optax.linear_schedule``, plus ``mid_point`` in ``[0, 1]`` and
    ``exponent >= 1``.

    Example::

        eps_at = smoothed_schedule(0.0, 0.2, transition_steps=2000, transition_begin=400)
        eps_at(0), eps_at(2400)      # 0.0, 0.2
    """
    if not isinstance(transition_steps, int) or not isinstance(transition_begin, int):
        raise TypeError("transition_steps and transition_begin must be ints (numbers of steps).")
    if transition_steps < 1 or transition_begin < 0:
        raise ValueError(f"need transition_steps >= 1 and transition_begin >= 0, got {transition_steps}, "
                         f"{transition_begin}.")
    if not 0.0 <= mid_point <= 1.0 or exponent < 1.0:
        raise ValueError(f"need 0 <= mid_point <= 1 and exponent >= 1, got {mid_point}, {exponent}.")
    polynomial_steps = int(transition_steps * mid_point)
    linear_steps = transition_steps - polynomial_steps
    if polynomial_steps == 0:
        alpha, mid_value = 0.0, init_value
    else:  # the linear part's slope equals the polynomial's derivative at the switch
        alpha = (end_value - init_value) / (polynomial_steps ** (exponent - 1)
                                            * (exponent * linear_steps + polynomial_steps))
        mid_value = init_value + alpha * polynomial_steps ** exponent

    def schedule(step):
        t = jnp.clip(jnp.asarray(step, jnp.float32) - transition_begin, 0.0, transition_steps)
        polynomial = init_value + alpha * t ** exponent
        if linear_steps == 0:
            return polynomial
        linear = mid_value + (end_value - mid_value) * (t - polynomial_steps) / linear_steps
        return jnp.where(t < polynomial_steps, polynomial, linear)

    return schedule


def crown_ibp_beta(eps_schedule: Schedule, eps_max: float) -> Schedule:
    """CROWN-IBP's mixing weight ``beta = 1 - eps / eps_max`` (Zhang et al. 2020):
    all CROWN-IBP at ``eps = 0``, all IBP once eps reaches ``eps_max``.

    Example::

        eps_at = optax.linear_schedule(0.0, 0.2, 2000, 400)
        beta_at = crown_ibp_beta(eps_at, 0.2)     # 1.0 until step 400, 0.0 from step 2400
    """
    if not eps_max > 0:
        raise ValueError(f"eps_max must be positive, got {eps_max}.")
    return lambda step: jnp.clip(1.0 - eps_schedule(step) / eps_max, 0.0, 1.0)
