"""Branch and bound over the input box (for low-dimensional inputs such as ACAS Xu's 5).

Domains are sub-boxes, held on the host as two ``(domains, *input_shape)`` arrays and
sent to the device a batch at a time (padded to one of a few sizes, each one compilation):
one compiled call bounds the margin of every box in the batch. A box whose margin bound
is positive is proved; the others are halved along the input whose coefficient in the
bound, times its width, is largest (the "smart" input branching of alpha-beta-CROWN),
and each box's centre is checked as a counterexample on the way.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlirpa.bab.bounding import Bounder
from jaxlirpa.bab.problem import Problem
from jaxlirpa.bab.report import Outcome, Progress


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)]) if len(a) < size else a


def _batch_size(n: int, largest: int) -> int:
    """The padded batch size for ``n`` domains: 16, 128, 1024, ... up to ``largest``
    (each size is one compilation; padding costs less than compiling)."""
    size = 16
    while size < n:
        size *= 8
    return min(size, largest)


def _halve(lo, hi, dims):
    """Split each box in two along its chosen dimension (at the midpoint)."""
    flat_lo, flat_hi = lo.reshape(len(lo), -1), hi.reshape(len(hi), -1)
    rows = np.arange(len(lo))
    mid = (flat_lo[rows, dims] + flat_hi[rows, dims]) / 2
    left_hi, right_lo = flat_hi.copy(), flat_lo.copy()
    left_hi[rows, dims], right_lo[rows, dims] = mid, mid
    return (np.concatenate([flat_lo, right_lo]).reshape(-1, *lo.shape[1:]),
            np.concatenate([left_hi, flat_hi]).reshape(-1, *lo.shape[1:]))


def input_split(problem: Problem, bounder: Bounder, deadline: float, *, batch: int = 1024,
                max_domains: int = 500_000, progress: Progress | None = None) -> Outcome:
    """Prove the property on ``problem``'s box or find a counterexample before ``deadline``
    (a ``time.monotonic()`` value). Returns an :class:`Outcome`."""
    lo, hi = problem.lower[None], problem.upper[None]
    visited, best = 0, -np.inf
    while len(lo):
        if time.monotonic() > deadline:
            return Outcome("timeout", domains=visited, best_bound=best)
        take = min(batch, len(lo))
        b_lo, b_hi = lo[-take:], hi[-take:]
        lo, hi = lo[:-take], hi[:-take]
        size = _batch_size(take, batch)
        bound, score, centre_margin = (np.asarray(a)[:take] for a in bounder.box_bounds(_pad(b_lo, size), _pad(b_hi, size)))
        visited += take
        found = np.flatnonzero(centre_margin <= 0)
        for k in found:
            cex = problem.counterexample((b_lo[k] + b_hi[k]) / 2)
            if cex is not None:
                return Outcome("sat", counterexample=cex, domains=visited, best_bound=best)
        open_ = bound <= 0
        if not open_.any():
            if progress is not None:
                progress.update(len(lo), float(best), visited)
            continue
        best = float(bound[open_].min())
        width = (b_hi - b_lo)[open_].reshape(int(open_.sum()), -1)
        # A box too thin to split further in float32 cannot be refined: give up on it.
        splittable = width > 4 * np.finfo(np.float32).eps * (1 + np.abs(b_hi[open_]).reshape(len(width), -1))
        score = np.where(splittable, score[open_] + 1e-12 * width, -1.0)
        if np.any(score.max(axis=1) < 0):
            return Outcome("unknown", domains=visited, best_bound=best)
        child_lo, child_hi = _halve(b_lo[open_], b_hi[open_], score.argmax(axis=1))
        lo, hi = np.concatenate([lo, child_lo]), np.concatenate([hi, child_hi])
        if len(lo) > max_domains:
            return Outcome("unknown", domains=visited, best_bound=best)
        if progress is not None:
            progress.update(len(lo), best, visited)
    return Outcome("unsat", domains=visited, best_bound=best)
