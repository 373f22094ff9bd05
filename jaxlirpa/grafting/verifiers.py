"""Per-instance verifiers for the grafting report: ``verifier(fn, x, label, eps) -> (status, seconds)``.

``fn`` maps a batch to logits, ``x`` is one example (no batch axis), ``eps`` the
L-inf radius. The status follows VNN-COMP: ``"unsat"`` when robustness is proven
(no counterexample exists), ``"sat"`` when a counterexample is known, ``"unknown"``
when an incomplete method gives up and ``"timeout"`` when a complete one runs out
of time. ``seconds`` is the wall time of the whole call, results included.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxlirpa

Verifier = Callable[[Callable, jnp.ndarray, int, float], tuple[str, float]]


def incomplete_verifier(method: str | Sequence[str] = "alpha-crown", *, lower: float | None = 0.0,
                        upper: float | None = 1.0, alpha: jaxlirpa.AlphaOptions | None = None) -> Verifier:
    """A verifier built on :func:`jaxlirpa.verified`: ``"sat"`` if ``x`` itself is
    misclassified, ``"unsat"`` if the margins' lower bounds are positive, else ``"unknown"``.

    **Arguments:**
    - ``method``: a bound method, or several tried in turn until one proves the
      property (e.g. ``("crown", "alpha-crown")``: cheap first, as complete verifiers do).
    - ``lower``, ``upper``: the input domain the eps-ball is clipped to.
    - ``alpha``: :class:`jaxlirpa.AlphaOptions` for ``"alpha-crown"``.

    Example::

        status, seconds = incomplete_verifier(("crown", "alpha-crown"))(fn, x_test[0], int(y_test[0]), 0.1)
    """
    methods = (method,) if isinstance(method, str) else tuple(method)
    if not methods:
        raise ValueError("incomplete_verifier needs at least one method.")

    def verify(fn, x, label, eps):
        start = time.perf_counter()
        xb, yb = jnp.asarray(x)[None], jnp.asarray([label])
        if int(np.argmax(jax.jit(fn)(xb)[0])) != int(label):
            return "sat", time.perf_counter() - start
        ball = jaxlirpa.LinfBall(eps, lower=lower, upper=upper)
        for m in methods:
            extra = {"alpha": alpha} if m == "alpha-crown" and alpha is not None else {}
            if bool(jaxlirpa.verified(fn, xb, yb, ball, method=m, **extra)[0]):
                return "unsat", time.perf_counter() - start
        return "unknown", time.perf_counter() - start

    return verify


def complete_verifier(timeout: float, *, lower: float = 0.0, upper: float = 1.0) -> Verifier:
    """A verifier running ``jaxlirpa.verify`` (branch and bound) on
    ``jaxlirpa.robustness_property`` with a per-instance ``timeout`` in seconds.

    Example: ``report(models, x, y, 0.1, verifier=complete_verifier(30.0))``.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}.")

    def verify(fn, x, label, eps):
        x = jnp.asarray(x)
        num_classes = fn(x[None]).shape[-1]
        prop = jaxlirpa.robustness_property(x, int(label), eps, num_classes, lower=lower, upper=upper)
        verdict = jaxlirpa.verify(fn, prop, timeout=timeout)
        return verdict.status, float(verdict.seconds)

    return verify


__all__ = ["Verifier", "complete_verifier", "incomplete_verifier"]
