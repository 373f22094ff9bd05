"""``jaxlirpa.verify``: complete verification, attack first, then branch and bound."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

from jaxlirpa.bab.bounding import Bounder
from jaxlirpa.bab.input_split import input_split
from jaxlirpa.bab.relu_split import relu_split
from jaxlirpa.bab.problem import Problem
from jaxlirpa.bab.report import Outcome, Progress, Verdict
from jaxlirpa.vnnlib import Property

BRANCHING = ("auto", "input", "relu")
INPUT_SPLIT_MAX_DIMS = 16
"""``branching="auto"`` splits the input box when it has at most this many perturbed inputs."""


def robustness_property(x, label: int, eps, num_classes: int, lower=0.0, upper=1.0) -> Property:
    """The local-robustness property of one example ``x`` (no batch axis): every input in
    the L-inf ball of radius ``eps`` (clipped to ``[lower, upper]``) keeps class ``label``.

    Example: ``jaxlirpa.verify(model, robustness_property(x, 3, 0.02, 10), timeout=30)``.
    """
    x = np.asarray(x, np.float32)
    if not 0 <= int(label) < num_classes:
        raise ValueError(f"label {label} is not a class of {num_classes}")
    eye = np.eye(num_classes, dtype=np.float32)
    disjuncts = [((eye[label] - eye[j])[None], np.zeros(1, np.float32)) for j in range(num_classes) if j != label]
    lo = np.maximum(x - eps, lower) if lower is not None else x - eps
    hi = np.minimum(x + eps, upper) if upper is not None else x + eps
    return Property(lo.astype(np.float32), hi.astype(np.float32), disjuncts)


def _combine(outcomes: list[Outcome]) -> Outcome:
    for status in ("sat", "timeout", "unknown"):
        for o in outcomes:
            if o.status == status:
                return o
    return outcomes[-1]


def verify(fn: Callable, properties: Property | Sequence[Property], *, input_shape=None,
           timeout: float = 60.0, branching: str = "auto",
           attack_restarts: int = 5, progress: bool = False, seed: int = 0) -> Verdict:
    """Decide whether ``fn`` satisfies the properties: ``"unsat"`` (no counterexample
    exists: proved), ``"sat"`` (one found, run through ``fn`` to check it), else
    ``"timeout"`` or ``"unknown"``.

    **Arguments:**
    - ``fn``: maps a batch of inputs (shaped ``(batch, *input_shape)``) to outputs.
    - ``properties``: a :class:`jaxlirpa.vnnlib.Property` or a list (as
      :func:`jaxlirpa.vnnlib.read` returns): each an input box and the output region
      that counts as a counterexample; see :func:`robustness_property`.
    - ``input_shape``: one input's shape; by default the property's (flat) shape.
    - ``timeout``: seconds for the whole call, compilation included.
    - ``branching``: ``"input"`` (split the input box), ``"relu"`` or ``"auto"``.

    Example::

        fn, shape = jaxlirpa.onnx.load("net.onnx")
        verdict = jaxlirpa.verify(fn, jaxlirpa.vnnlib.read("prop.vnnlib"), input_shape=shape[1:])
    """
    start = time.monotonic()
    deadline = start + float(timeout)
    if branching not in BRANCHING:
        raise ValueError(f"branching must be one of {BRANCHING}, got {branching!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    properties = [properties] if isinstance(properties, Property) else list(properties)
    if not properties:
        raise ValueError("no properties to verify")
    problems = [Problem.from_disjuncts(fn, np.shape(p.lower) if input_shape is None else input_shape,
                                       p.lower, p.upper, p.disjuncts)
                for p in properties]
    key, bounders = jax.random.key(seed), [Bounder(p) for p in problems]
    for problem, bounder in zip(problems, bounders):  # attack first: a counterexample ends the search
        key, sub = jax.random.split(key)
        xs, margins = bounder.attack(problem.lower[None], problem.upper[None], sub, restarts=attack_restarts)
        if np.asarray(margins)[0] <= 0 and (cex := problem.counterexample(xs[0])) is not None:
            return Verdict("sat", cex, time.monotonic() - start, 0, "attack")
    outcomes, how = [], branching
    bar = Progress(progress)
    try:
        for problem, bounder in zip(problems, bounders):
            dims = int(np.sum(problem.upper > problem.lower))
            how = branching if branching != "auto" else ("input" if dims <= INPUT_SPLIT_MAX_DIMS else "relu")
            search = input_split if how == "input" else relu_split
            outcome = search(problem, bounder, deadline, progress=bar)
            outcomes.append(outcome)
            if outcome.status != "unsat":
                break
    finally:
        bar.close()
    result = _combine(outcomes)
    searches = sorted({o.search for o in outcomes if o.search})
    return Verdict(result.status, result.counterexample, time.monotonic() - start,
                   sum(o.domains for o in outcomes), f"{how}-split" + (f" ({'; '.join(searches)})" if searches else ""))
