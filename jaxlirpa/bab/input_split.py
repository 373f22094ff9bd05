"""Branch and bound over the input box (for low-dimensional inputs such as ACAS Xu's 5).

Domains are sub-boxes, held on the host as ``(domains, *input_shape)`` arrays. Each step
takes the most recent open boxes (depth first, so memory stays small), splits them and
bounds the children in one compiled call (padded to one of a few batch sizes, each one
compilation). A box keeps the intermediate bounds it was bounded with: they hold in its
children too, so a child starts from them and recomputes CROWN bounds of only a few
unstable neurons per layer (:func:`~jaxlirpa.bab.bounding.sub_box_intervals`), several
times cheaper than full CROWN and, met with every ancestor's, often tighter. Every
child's centre and the corner minimising its decisive linear bound are checked as
counterexamples. The input to halve is the one whose coefficient in the box's decisive
linear bound, times its width, is largest (alpha-beta-CROWN's "smart" branching, with
every coefficient floored at :data:`~jaxlirpa.bab.bounding.SCORE_FLOOR` of the largest).
Two searches run interleaved (:data:`PORTFOLIO`): one always starts children from their
parent's bounds, one gives children of crowded parents plain CROWN; on ACAS Xu each
solves instances where the other stalls.
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


def _coefficient_scores(lo, hi, score):
    """Each box's coefficient score per input (ties to the wider input), ``-inf`` on
    inputs too thin to halve: shape (boxes, inputs)."""
    width = (hi - lo).reshape(len(lo), -1)
    return np.where(_splittable(hi, width), score + 1e-12 * width, -np.inf)


def _splittable(parent_hi, width):
    """Inputs wide enough to halve in float32."""
    return width > 4 * np.finfo(np.float32).eps * (1 + np.abs(parent_hi).reshape(width.shape))


PORTFOLIO = (("reuse", False, 1), ("refresh", True, 1))
"""The searches :func:`input_split` runs side by side: (name, whether children of boxes
with more than ``rows`` unstable neurons in a layer get plain CROWN instead of their
parent's bounds, share of the time). On ACAS Xu neither dominates: 4_9/prop_1 takes
3,500 boxes with refresh and 50,000 without; 3_3/prop_2 and 4_2/prop_2 end sooner
without."""


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
    names = [name for name, _, _ in PORTFOLIO]
    searches = [_search(problem, bounder, refresh, batch, max_domains, iterations, rows, progress,
                        OPEN_BYTES // len(PORTFOLIO)) for _, refresh, _ in PORTFOLIO]
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


def _search(problem, bounder, refresh, batch, max_domains, iterations, rows, progress, open_bytes):
    """One depth-first search, as a generator: it yields the number of boxes bounded so
    far and the lowest bound of an open box after every step and returns its
    :class:`Outcome` (never ``"timeout"``); its open boxes may take ``open_bytes`` of
    host memory. With ``refresh``, children of crowded boxes get plain CROWN
    (:func:`_bound_children`)."""
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
    per_step = max(1, batch // 2)
    while len(open_boxes[0]):
        yield visited, best
        take = min(per_step, len(open_boxes[0]))
        parent_lo, parent_hi, parent_score, parent_ref, parent_unstable = _tree(lambda a: a[-take:], open_boxes)
        open_boxes = _tree(lambda a: a[:-take], open_boxes)
        choice = _coefficient_scores(parent_lo, parent_hi, parent_score)
        ok = np.isfinite(choice.max(axis=1))
        kept_lo, kept_hi = _halve(parent_lo, parent_hi, choice.argmax(axis=1))
        ref, unstable = _tree(lambda a: np.concatenate([a, a]), (parent_ref, parent_unstable))
        kept, kept_score, point, margin, kept_ref, kept_unstable = _bound_children(
            bounder, kept_lo, kept_hi, ref, unstable, iterations, batch, rows, refresh)
        visited += len(kept_lo)
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
