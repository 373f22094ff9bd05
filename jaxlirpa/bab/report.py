"""What a verification run returns, and its live progress line."""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np


@dataclasses.dataclass
class Outcome:
    """The result of one search: ``status`` is ``"sat"``, ``"unsat"``, ``"timeout"`` or
    ``"unknown"``; ``counterexample`` is ``(x, f(x))`` for ``"sat"``; ``search`` names
    the search of a portfolio that decided, if any."""

    status: str
    counterexample: tuple[np.ndarray, np.ndarray] | None = None
    domains: int = 0
    best_bound: float = -np.inf
    search: str = ""


@dataclasses.dataclass
class Verdict:
    """The answer of :func:`jaxlirpa.verify`.

    **Fields:** ``status`` (``"sat"``: a counterexample exists, ``"unsat"``: the property
    holds, ``"timeout"`` or ``"unknown"``), ``counterexample`` (``(x, y)`` with
    ``y = fn(x)`` for ``"sat"``, checked by running the network), ``seconds`` (wall
    time), ``domains`` (sub-problems bounded), ``method`` (how it was decided).
    """

    status: str
    counterexample: tuple[np.ndarray, np.ndarray] | None
    seconds: float
    domains: int
    method: str

    def __str__(self) -> str:
        return self.status


class Progress:
    """A live line on stderr: domains left, best bound, domains bounded, elapsed time."""

    def __init__(self, enabled: bool = True, stream=sys.stderr):
        self.enabled, self.stream, self.start = enabled and stream.isatty(), stream, time.monotonic()

    def update(self, left: int, best: float, visited: int) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            self.stream.write(f"\r{left} domains left | best bound {best:+.4g} | {visited} bounded | {elapsed:.1f}s  ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
