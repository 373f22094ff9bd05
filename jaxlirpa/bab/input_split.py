"""Branch and bound over the input box (for low-dimensional inputs such as ACAS Xu's 5).

Domains are sub-boxes, held on the host as ``(domains, *input_shape)`` arrays. Each step
takes the most recent open boxes (depth first, so memory stays small), splits them and
bounds the children in one compiled call (padded to one of a few batch sizes, each one
compilation). A box keeps the intermediate bounds it was bounded with: they hold in its
children too, so a child starts from them and recomputes CROWN bounds of only a few
unstable neurons per layer (:func:`~jaxlirpa.bab.bounding.sub_box_intervals`), several
times cheaper than full CROWN and, met with every ancestor's, often tighter. Every
child's centre and the corner minimising its decisive linear bound are checked as
counterexamples. Two ways to choose the input to halve:
- ``"lookahead"``: halve each box along every input (or the :data:`LOOKAHEAD_CANDIDATES`
  of largest coefficient score), bound all those children and keep the split whose
  children bound best (the sum of their gaps below zero; ties to the relatively widest
  input). ``n`` times more bounds per step, far smaller trees mostly.
- ``"coefficient"``: the input whose coefficient in the decisive bound, times its width,
  is largest (alpha-beta-CROWN's "smart" branching): one bound per child.
On ACAS Xu each has solved instances where the other stalls, so :func:`input_split`
runs a portfolio (:data:`PORTFOLIO`) of searches interleaved step by step.
Each box's output slopes (alpha) are tuned by a few Adam steps and a conjunction's rows
are combined (:func:`~jaxlirpa.bab.bounding.combined_rows`): on ACAS Xu's hardest
instances this proves most of the boxes that plain CROWN leaves open.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from jaxlirpa.bab.bounding import Bounder
from jaxlirpa.bab.problem import Problem
from jaxlirpa.bab.report import Outcome, Progress


OPEN_BYTES = 2 << 30
"""Host memory the open boxes of all searches may take (with their intermediate bounds);
a search that needs more ends ``"unknown"``."""


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


def _children(lo, hi, dims):
    """Every box halved along each of its candidate inputs ``dims`` (boxes, candidates):
    ``(boxes, candidates, 2, inputs)`` lower and upper corners."""
    m, n = len(lo), lo[0].size
    k = dims.shape[1]
    flat_lo, flat_hi = lo.reshape(m, -1), hi.reshape(m, -1)
    rows, cands = np.arange(m)[:, None], np.arange(k)[None]
    mid = (flat_lo[rows, dims] + flat_hi[rows, dims]) / 2
    child_lo = np.broadcast_to(flat_lo[:, None, None], (m, k, 2, n)).copy()
    child_hi = np.broadcast_to(flat_hi[:, None, None], (m, k, 2, n)).copy()
    child_hi[rows, cands, 0, dims] = mid
    child_lo[rows, cands, 1, dims] = mid
    return child_lo, child_hi


def _tree(fn, *trees):
    """``fn`` on every array of the trees (a box's corners, scores and intermediate bounds)."""
    return jax.tree_util.tree_map(fn, *trees)


def _bound(bounder, lo, hi, reference, iterations, size_limit, rows):
    """``bounder.box_bounds`` of the boxes, padded to a compiled batch size, as host arrays."""
    size = padded_size(len(lo), size_limit)
    reference = _tree(lambda a: pad(np.asarray(a), size), reference)
    out = bounder.box_bounds(pad(lo, size), pad(hi, size), reference, iterations, rows)
    return _tree(lambda a: np.asarray(a)[:len(lo)], out)


def _bound_children(bounder, lo, hi, parent_ref, parent_unstable, iterations, size_limit, rows, refresh):
    """Bound sub-boxes from their parent's intermediate bounds, recomputing ``rows``
    neurons per layer (as tight as recomputing all where the parent had at most that
    many unstable ones, and cheaper). With ``refresh``, sub-boxes of parents with more
    get plain CROWN instead (large boxes, and points where many neurons meet their kink,
    where a stale bound might never tighten)."""
    crowded = (parent_unstable > rows) if refresh else np.zeros(len(lo), bool)
    parts = []
    for part, reuse in ((crowded, False), (~crowded, True)):
        if part.any():
            ref = _tree(lambda a: a[part], parent_ref) if reuse else None
            parts.append((part, _bound(bounder, lo[part], hi[part], ref, iterations, size_limit, rows)))
    out = _tree(lambda a: np.empty((len(lo), *a.shape[1:]), a.dtype), parts[0][1])
    for part, result in parts:
        _tree(lambda whole, piece: whole.__setitem__(part, piece), out, result)
    return out


def _choose_lookahead(bounder, problem, parents, iterations, size_limit, rows, refresh, candidates):
    """Bound the halvings along each box's ``candidates`` inputs of largest coefficient
    score (filtered smart branching; all inputs when it is at least their number) and
    return (children lo, hi, bounds, points, point margins, intermediate bounds,
    unstable counts) of the best halving per box."""
    parent_lo, parent_hi, parent_score, parent_ref, parent_unstable = parents
    shape, n, take = problem.lower.shape, problem.lower.size, len(parent_lo)
    width = (parent_hi - parent_lo).reshape(take, n)
    splittable = _splittable(parent_hi, width)
    k = min(candidates, n)
    dims = np.argsort(-_coefficient_scores(parent_lo, parent_hi, parent_score), axis=1, kind="stable")[:, :k]
    child_lo, child_hi = _children(parent_lo, parent_hi, dims)
    flat_lo, flat_hi = child_lo.reshape(-1, *shape), child_hi.reshape(-1, *shape)
    ref, unstable = _tree(lambda a: np.repeat(a, 2 * k, axis=0), (parent_ref, parent_unstable))
    bound, score, point, margin, kept_ref, unstable = _bound_children(bounder, flat_lo, flat_hi, ref, unstable,
                                                                      iterations, size_limit, rows, refresh)
    bound = bound.reshape(take, k, 2)
    boxes = np.arange(take)[:, None]
    full_width = np.maximum((problem.upper - problem.lower).reshape(-1), 1e-12)
    gap = np.minimum(bound, 0).sum(axis=2)
    relative = width[boxes, dims] / full_width[dims]
    worth = np.where(splittable[boxes, dims], gap + 1e-3 * relative * np.abs(gap).mean(), -np.inf)
    best = worth.argmax(axis=1)
    ok = np.isfinite(worth.max(axis=1))
    chosen = lambda a: a.reshape(take, k, 2, *a.shape[1:])[np.arange(take), best].reshape(-1, *a.shape[1:])
    return (chosen(flat_lo), chosen(flat_hi), chosen(bound.reshape(-1)), chosen(score), chosen(point),
            chosen(margin), _tree(chosen, kept_ref), chosen(unstable), ok, len(flat_lo))


def _coefficient_scores(lo, hi, score):
    """Each box's coefficient score per input (ties to the wider input), ``-inf`` on
    inputs too thin to halve: shape (boxes, inputs)."""
    width = (hi - lo).reshape(len(lo), -1)
    return np.where(_splittable(hi, width), score + 1e-12 * width, -np.inf)


def _splittable(parent_hi, width):
    """Inputs wide enough to halve in float32."""
    return width > 4 * np.finfo(np.float32).eps * (1 + np.abs(parent_hi).reshape(width.shape))


LOOKAHEAD_CANDIDATES = 5
"""How many inputs (those of largest coefficient score) look-ahead halves and bounds per
box: all of ACAS Xu's 5 (on its hardest instance the score's top 3 miss the best split
and the tree grows six-fold); wider inputs are filtered to these (filtered smart branching)."""

PORTFOLIO = (("lookahead", False, 3), ("coefficient", False, 1), ("coefficient", True, 1), ("lookahead", True, 1))
"""The searches :func:`input_split` runs side by side: (branching, whether children of
boxes with more than ``rows`` unstable neurons in a layer get plain CROWN instead of
their parent's bounds, share of the time). On ACAS Xu the depth-first search is
erratic: each of these solves hard instances in seconds where another stalls; plain
look-ahead proves most of the hardest unsat ones, coefficient branching finds the
deepest counterexamples first."""


def input_split(problem: Problem, bounder: Bounder, deadline: float, *, batch: int = 1024,
                max_domains: int = 500_000, iterations: int = 5, rows: int = 16,
                progress: Progress | None = None) -> Outcome:
    """Prove the property on ``problem``'s box or find a counterexample before ``deadline``
    (a ``time.monotonic()`` value), by the searches of :data:`PORTFOLIO` interleaved:
    the one furthest below its share of the time used takes the next step, so the answer
    comes in the fastest search's time over its share, whichever search that is (run
    one after another, each would need a guess of its time). ``iterations`` tunes each
    box's output slopes (alpha) by that many steps; ``rows`` is how many neurons per
    layer a sub-box's bounds recompute (:func:`_bound_children`). Returns an
    :class:`Outcome` whose ``search`` names the search that decided."""
    names = [f"{strategy}{', refresh' if refresh else ''}" for strategy, refresh, _ in PORTFOLIO]
    searches = [_search(problem, bounder, strategy, refresh, batch, max_domains, iterations, rows, progress,
                        OPEN_BYTES // len(PORTFOLIO)) for strategy, refresh, _ in PORTFOLIO]
    shares = [share for _, _, share in PORTFOLIO]
    used, state, ended = [0.0] * len(searches), [(0, -np.inf)] * len(searches), []
    total = lambda: sum(d for d, _ in state) + sum(o.domains for o in ended)  # noqa: E731
    while searches:
        if time.monotonic() > deadline:
            best = max([b for _, b in state] + [o.best_bound for o in ended])
            return Outcome("timeout", domains=total(), best_bound=best)
        k = min(range(len(searches)), key=lambda j: used[j] / shares[j])
        began = time.monotonic()
        try:
            state[k] = next(searches[k])
            used[k] += time.monotonic() - began
            continue
        except StopIteration as stop:
            outcome = stop.value
        outcome.search = names[k]
        if outcome.status in ("sat", "unsat"):
            outcome.domains = total() - state[k][0] + outcome.domains
            return outcome
        ended.append(outcome)  # "unknown" (out of memory, or boxes too thin to halve): the others go on
        for kept in (searches, used, state, shares, names):
            del kept[k]
    return Outcome("unknown", domains=total(), best_bound=max(o.best_bound for o in ended))


def _search(problem, bounder, strategy, refresh, batch, max_domains, iterations, rows, progress, open_bytes):
    """One depth-first search, as a generator: it yields the number of boxes bounded so
    far and the lowest bound of an open box after every step and returns its
    :class:`Outcome` (never ``"timeout"``); its
    open boxes may take ``open_bytes`` of host memory."""
    n = problem.lower.size
    lo, hi = problem.lower[None], problem.upper[None]
    bound, score, _, _, ref, unstable = _bound(bounder, lo, hi, None, iterations, batch, rows)
    best = float(bound[0])
    if best > 0:
        return Outcome("unsat", domains=1, best_bound=best)
    visited = 1
    # The stack of open boxes, each with what its children start from.
    open_boxes = (lo, hi, score, ref, unstable)
    per_box = sum(a[0].nbytes for a in jax.tree_util.tree_leaves(open_boxes))
    max_domains = min(max_domains, open_bytes // per_box)
    per_step = max(1, batch // (2 * min(n, LOOKAHEAD_CANDIDATES))) if strategy == "lookahead" else max(1, batch // 2)
    while len(open_boxes[0]):
        yield visited, best
        take = min(per_step, len(open_boxes[0]))
        parents = _tree(lambda a: a[-take:], open_boxes)
        open_boxes = _tree(lambda a: a[:-take], open_boxes)
        if strategy == "lookahead":
            kept_lo, kept_hi, kept, kept_score, point, margin, kept_ref, kept_unstable, ok, bounded = (
                _choose_lookahead(bounder, problem, parents, iterations, batch, rows, refresh, LOOKAHEAD_CANDIDATES))
        else:
            parent_lo, parent_hi, parent_score, parent_ref, parent_unstable = parents
            choice = _coefficient_scores(parent_lo, parent_hi, parent_score)
            ok = np.isfinite(choice.max(axis=1))
            kept_lo, kept_hi = _halve(parent_lo, parent_hi, choice.argmax(axis=1))
            ref, unstable = _tree(lambda a: np.concatenate([a, a]), (parent_ref, parent_unstable))
            kept, kept_score, point, margin, kept_ref, kept_unstable = _bound_children(
                bounder, kept_lo, kept_hi, ref, unstable, iterations, batch, rows, refresh)
            bounded = len(kept_lo)
        visited += bounded
        for k in np.flatnonzero(margin <= 0):
            cex = problem.counterexample(point[k])
            if cex is not None:
                return Outcome("sat", counterexample=cex, domains=visited, best_bound=best)
        if not ok.all():
            return Outcome("unknown", domains=visited, best_bound=best)
        still_open = kept <= 0
        if still_open.any():
            best = float(kept[still_open].min())
        kept_boxes = _tree(lambda a: a[still_open], (kept_lo, kept_hi, kept_score, kept_ref, kept_unstable))
        open_boxes = _tree(lambda a, b: np.concatenate([a, b]), open_boxes, kept_boxes)
        if len(open_boxes[0]) > max_domains:
            return Outcome("unknown", domains=visited, best_bound=best)
        if progress is not None:
            progress.update(len(open_boxes[0]), best, visited)
    return Outcome("unsat", domains=visited, best_bound=best)
