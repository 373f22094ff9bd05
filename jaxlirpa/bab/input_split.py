"""Branch and bound over the input box (for low-dimensional inputs such as ACAS Xu's 5).

Domains are sub-boxes, held on the host as ``(domains, *input_shape)`` arrays. Each step
takes the most recent open boxes (depth first, so memory stays small), splits them and
bounds the children in one compiled call (padded to one of a few batch sizes, each one
compilation); every child's centre is checked as a counterexample. Two ways to choose
the input to halve:
- ``"lookahead"``: halve each box along *every* input, bound all ``2n`` children and keep
  the split whose children bound best (the sum of their gaps below zero; ties to the
  relatively widest input). ``n`` times more bounds per step, far smaller trees mostly.
- ``"coefficient"``: the input whose coefficient in the decisive bound, times its width,
  is largest (alpha-beta-CROWN's "smart" branching): one bound per child.
On ACAS Xu each solves instances where the other stalls, so :func:`input_split` runs
them as a portfolio: look-ahead for the first part of the time, then the other.
"""
from __future__ import annotations

import time

import numpy as np

from jaxlirpa.bab.bounding import Bounder
from jaxlirpa.bab.problem import Problem
from jaxlirpa.bab.report import Outcome, Progress


def padded_size(n: int, largest: int) -> int:
    """The padded batch size for ``n`` domains: 16, 128, 1024, ... (at least ``n``, at
    most ``largest`` unless ``n`` is larger); each size is one compilation."""
    size = 16
    while size < n:
        size *= 8
    return max(n, min(size, largest))


def pad(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with its first row repeated up to ``size`` rows."""
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)]) if len(a) < size else a


def _halve(lo, hi, dims):
    """Each box split in two along its chosen input (at the midpoint), left halves first."""
    flat_lo, flat_hi = lo.reshape(len(lo), -1), hi.reshape(len(hi), -1)
    rows = np.arange(len(lo))
    mid = (flat_lo[rows, dims] + flat_hi[rows, dims]) / 2
    left_hi, right_lo = flat_hi.copy(), flat_lo.copy()
    left_hi[rows, dims], right_lo[rows, dims] = mid, mid
    return (np.concatenate([flat_lo, right_lo]).reshape(-1, *lo.shape[1:]),
            np.concatenate([left_hi, flat_hi]).reshape(-1, *lo.shape[1:]))


def _children(lo, hi):
    """Every box halved along every input: ``(boxes, inputs, 2, inputs)`` lower and upper corners."""
    m, n = len(lo), lo[0].size
    flat_lo, flat_hi = lo.reshape(m, -1), hi.reshape(m, -1)
    mid = (flat_lo + flat_hi) / 2
    child_lo = np.broadcast_to(flat_lo[:, None, None], (m, n, 2, n)).copy()
    child_hi = np.broadcast_to(flat_hi[:, None, None], (m, n, 2, n)).copy()
    dims = np.arange(n)
    child_hi[:, dims, 0, dims] = mid
    child_lo[:, dims, 1, dims] = mid
    return child_lo, child_hi


def _choose_lookahead(bounder, problem, parent_lo, parent_hi, iterations, size_limit):
    """Bound all halvings; return (children lo, hi, bounds, centre margins) of the best one per box."""
    shape, n, take = problem.lower.shape, problem.lower.size, len(parent_lo)
    child_lo, child_hi = _children(parent_lo, parent_hi)
    flat_lo, flat_hi = child_lo.reshape(-1, *shape), child_hi.reshape(-1, *shape)
    size = padded_size(len(flat_lo), size_limit)
    bound, _, centre = (np.asarray(a)[:len(flat_lo)] for a in
                        bounder.box_bounds(pad(flat_lo, size), pad(flat_hi, size), iterations))
    bound, centre = bound.reshape(take, n, 2), centre.reshape(take, n, 2)
    width = (parent_hi - parent_lo).reshape(take, n)
    full_width = np.maximum((problem.upper - problem.lower).reshape(1, n), 1e-12)
    gap = np.minimum(bound, 0).sum(axis=2)
    worth = np.where(_splittable(parent_hi, width), gap + 1e-3 * (width / full_width) * np.abs(gap).mean(), -np.inf)
    rows, dims = np.arange(take), worth.argmax(axis=1)
    ok = np.isfinite(worth.max(axis=1))
    return (child_lo[rows, dims].reshape(-1, *shape), child_hi[rows, dims].reshape(-1, *shape),
            bound[rows, dims].reshape(-1), centre[rows, dims].reshape(-1), ok, len(flat_lo))


def _splittable(parent_hi, width):
    """Inputs wide enough to halve in float32."""
    return width > 4 * np.finfo(np.float32).eps * (1 + np.abs(parent_hi).reshape(width.shape))


def input_split(problem: Problem, bounder: Bounder, deadline: float, *, batch: int = 1024,
                max_domains: int = 500_000, iterations: int = 0, lookahead_share: float = 0.5,
                progress: Progress | None = None) -> Outcome:
    """Prove the property on ``problem``'s box or find a counterexample before ``deadline``
    (a ``time.monotonic()`` value): look-ahead branching for ``lookahead_share`` of the
    time, then coefficient branching from the start for the rest. ``iterations`` tunes
    each box's output slopes (alpha) by that many steps. Returns an :class:`Outcome`."""
    start = time.monotonic()
    switch = start + lookahead_share * (deadline - start)
    outcome = _search(problem, bounder, switch, "lookahead", batch, max_domains, iterations, progress)
    if outcome.status != "timeout" or time.monotonic() >= deadline:
        return outcome
    second = _search(problem, bounder, deadline, "coefficient", batch, max_domains, iterations, progress)
    second.domains += outcome.domains
    return second


def _search(problem, bounder, deadline, strategy, batch, max_domains, iterations, progress) -> Outcome:
    n = problem.lower.size
    lo, hi = problem.lower[None], problem.upper[None]
    bound, score, _ = (np.asarray(a) for a in bounder.box_bounds(lo, hi, iterations))
    best = float(bound[0])
    if best > 0:
        return Outcome("unsat", domains=1, best_bound=best)
    visited = 1
    per_step = max(1, batch // (2 * n)) if strategy == "lookahead" else max(1, batch // 2)
    while len(lo):
        if time.monotonic() > deadline:
            return Outcome("timeout", domains=visited, best_bound=best)
        take = min(per_step, len(lo))
        parent_lo, parent_hi, parent_score = lo[-take:], hi[-take:], score[-take:]
        lo, hi, score = lo[:-take], hi[:-take], score[:-take]
        if strategy == "lookahead":
            kept_lo, kept_hi, kept, centre, ok, bounded = _choose_lookahead(
                bounder, problem, parent_lo, parent_hi, iterations, 2 * n * per_step)
            kept_score = np.zeros((len(kept), n))
        else:
            width = (parent_hi - parent_lo).reshape(take, n)
            choice = np.where(_splittable(parent_hi, width), parent_score + 1e-12 * width, -np.inf)
            ok = np.isfinite(choice.max(axis=1))
            kept_lo, kept_hi = _halve(parent_lo, parent_hi, choice.argmax(axis=1))
            size = padded_size(len(kept_lo), batch)
            kept, kept_score, centre = (np.asarray(a)[:len(kept_lo)] for a in
                                        bounder.box_bounds(pad(kept_lo, size), pad(kept_hi, size), iterations))
            bounded = len(kept_lo)
        visited += bounded
        for k in np.flatnonzero(centre <= 0):
            cex = problem.counterexample((kept_lo[k] + kept_hi[k]) / 2)
            if cex is not None:
                return Outcome("sat", counterexample=cex, domains=visited, best_bound=best)
        if not ok.all():
            return Outcome("unknown", domains=visited, best_bound=best)
        still_open = kept <= 0
        if still_open.any():
            best = float(kept[still_open].min())
        lo, hi = np.concatenate([lo, kept_lo[still_open]]), np.concatenate([hi, kept_hi[still_open]])
        score = np.concatenate([score, kept_score[still_open]])
        if len(lo) > max_domains:
            return Outcome("unknown", domains=visited, best_bound=best)
        if progress is not None:
            progress.update(len(lo), best, visited)
    return Outcome("unsat", domains=visited, best_bound=best)
