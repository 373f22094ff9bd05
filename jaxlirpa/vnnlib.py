"""Read VNN-LIB properties (the VNN-COMP subset) and write VNN-COMP result files.

A VNN-LIB file describes the *counterexample* region: an input x (`X_i`, the network input
flattened in row-major order) whose output y = f(x) (`Y_j`) satisfies every assertion
violates the property, and a verifier answers "sat" (found) or "unsat" (proved none exists).

`read` brings the assertions to disjunctive normal form and groups the disjuncts by input box.
Convention: the property is VIOLATED iff for some `Property` p, some x with
p.lower <= x <= p.upper, and some (C, d) in p.disjuncts, every row of C @ f(x) <= d holds.
Proving it means showing, for every p and every (C, d), that each x in the box has some row
with (C @ f(x))_k > d_k; one row whose lower bound over the whole box exceeds d_k suffices.

Example:

    for p in read("acasxu/prop_6.vnnlib"):             # two input boxes
        lower, upper = p.lower, p.upper                  # shape (5,)
        for C, d in p.disjuncts:                         # C: (rows, 5), d: (rows,)
            ...
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERDICTS = ("sat", "unsat", "unknown", "timeout", "error")
_TOKEN = re.compile(r"[()]|[^\s()]+")
_VARIABLE = re.compile(r"([XY])_(\d+)")


@dataclass(frozen=True, eq=False)
class Property:
    """One input box and the output region, in DNF, that counts as a counterexample in it.

    **Fields:** `lower`, `upper`: input bounds, shape (num_inputs,). `disjuncts`: list of
    (C, d), C of shape (rows, num_outputs) and d of shape (rows,); the property is violated
    iff some x in the box has, for some disjunct, all rows of C @ f(x) <= d.
    """

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: list[tuple[np.ndarray, np.ndarray]]


class _List(list):
    """A parenthesised s-expression, with the line where it opens (for error messages)."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line


class _Token(str):
    """A symbol or number of an s-expression, with its line (for error messages)."""

    def __new__(cls, text: str, line: int):
        token = super().__new__(cls, text)
        token.line = line
        return token


def _show(expr) -> str:
    """An s-expression written back as text."""
    return f"({' '.join(map(_show, expr))})" if isinstance(expr, list) else expr


def _brief(expr) -> str:
    """An s-expression as text short enough for an error message."""
    text = _show(expr)
    return text if len(text) <= 80 else text[:77] + "..."


def _sexprs(text: str, source: str) -> list[_List]:
    """The top-level s-expressions of `text`, comments (`;` to end of line) removed."""
    stack = [_List(0)]
    for line_number, line in enumerate(text.splitlines(), 1):
        for token in _TOKEN.findall(line.split(";", 1)[0]):
            if token == "(":
                stack.append(_List(line_number))
            elif token == ")":
                if len(stack) == 1:
                    raise ValueError(f"{source}:{line_number}: unbalanced ')'")
                closed = stack.pop()
                stack[-1].append(closed)
            elif len(stack) == 1:
                raise ValueError(f"{source}:{line_number}: {token!r} outside parentheses")
            else:
                stack[-1].append(_Token(token, line_number))
    if len(stack) > 1:
        raise ValueError(f"{source}:{stack[-1].line}: '(' is never closed")
    return stack[0]


class _Reader:
    """Turns the parsed commands of one file into `Property`s."""

    def __init__(self, commands: list[_List], source: str):
        self.source = source
        self.names: dict[str, tuple[str, int]] = {}
        formulas = []
        for command in commands:
            if command[:1] == ["declare-const"]:
                self.declare(command)
            elif command[:1] == ["assert"] and len(command) == 2:
                formulas.append(command[1])
            else:
                self.fail(command, f"unsupported command {_brief(command)}, expected "
                                   "(declare-const X_i Real) or (assert formula)")
        self.formulas = formulas
        self.sizes = {}
        for kind in "XY":
            indices = sorted(i for k, i in self.names.values() if k == kind)
            if indices != list(range(len(indices))):
                raise ValueError(f"{source}: the {kind}_ variables are not numbered 0, 1, 2, ...")
            self.sizes[kind] = len(indices)

    def fail(self, expr, problem: str):
        raise ValueError(f"{self.source}:{expr.line}: {problem}")

    def declare(self, command: _List):
        """Record `(declare-const X_i Real)` or `(declare-const Y_j Real)`."""
        match = len(command) == 3 and _VARIABLE.fullmatch(command[1])
        if not match or command[2] != "Real" or command[1] in self.names:
            self.fail(command, f"expected a new (declare-const X_i Real) or Y_j: {_brief(command)}")
        self.names[command[1]] = (match[1], int(match[2]))

    def dnf(self, expr) -> list[list[tuple]]:
        """`expr` as a list of conjunctions (lists of atoms, see `atom`)."""
        head = expr[0] if isinstance(expr, list) and expr else None
        if head == "and":
            return [list(itertools.chain(*parts))
                    for parts in itertools.product(*map(self.dnf, expr[1:]))]
        if head == "or":
            return [conjunction for part in expr[1:] for conjunction in self.dnf(part)]
        if head in ("<=", ">=") and len(expr) == 3:
            return [[self.atom(expr)]]
        self.fail(expr, f"expected (and ...), (or ...), (<= a b) or (>= a b), got {_brief(expr)}")

    def term(self, token, expr) -> tuple[str, float]:
        """A variable as ("X" or "Y", index), or a number as ("c", value)."""
        if isinstance(token, str) and token in self.names:
            return self.names[token]
        try:
            value = float(token)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            self.fail(expr, f"{_brief(token)} is neither a declared variable nor a finite number")
        return "c", value

    def atom(self, expr) -> tuple:
        """`(<= a b)` or `(>= a b)` as ("lower"/"upper", i, value) on X_i or ("row", row, d)."""
        lhs, rhs = (self.term(t, expr) for t in (expr[1:] if expr[0] == "<=" else expr[:0:-1]))
        if (lhs[0], rhs[0]) == ("X", "c"):
            return "upper", lhs[1], rhs[1]
        if (lhs[0], rhs[0]) == ("c", "X"):
            return "lower", rhs[1], lhs[1]
        if "X" in (lhs[0], rhs[0]) or (lhs[0], rhs[0]) == ("c", "c"):
            self.fail(expr, f"only X_i vs number and Y vs Y or number are supported: "
                            f"{_brief(expr)}")
        row, bound = np.zeros(self.sizes["Y"]), 0.0
        for sign, (kind, value) in ((1, lhs), (-1, rhs)):
            if kind == "Y":
                row[value] += sign
            else:
                bound -= sign * value
        return "row", row, bound

    def conjunction(self, atoms: list[tuple]) -> tuple[np.ndarray, ...]:
        """(lower, upper, C, d) of one conjunction of atoms; every X_i must be bounded."""
        lower, upper = np.full(self.sizes["X"], -np.inf), np.full(self.sizes["X"], np.inf)
        rows, ds = [], []
        for kind, where, value in atoms:
            if kind == "lower":
                lower[where] = max(lower[where], value)
            elif kind == "upper":
                upper[where] = min(upper[where], value)
            else:
                rows.append(where)
                ds.append(value)
        unbounded = np.flatnonzero(np.isinf(lower) | np.isinf(upper))
        if unbounded.size:
            raise ValueError(f"{self.source}: X_{unbounded[0]} lacks a lower or upper bound")
        return lower, upper, np.reshape(rows, (-1, self.sizes["Y"])), np.asarray(ds, float)

    def properties(self) -> list[Property]:
        """The DNF of all assertions, its disjuncts grouped by input box."""
        by_box: dict[bytes, Property] = {}
        for atoms in self.dnf(["and", *self.formulas]):
            lower, upper, C, d = self.conjunction(atoms)
            prop = by_box.setdefault(lower.tobytes() + upper.tobytes(), Property(lower, upper, []))
            prop.disjuncts.append((C, d))
        return list(by_box.values())


def read(source: str | os.PathLike, num_inputs: int | None = None,
         num_outputs: int | None = None) -> list[Property]:
    """Parse a VNN-LIB file (a path) or its text (a string starting with '(' or ';').

    Returns the properties described in the module docstring: the property is violated iff
    for some returned p, some x in [p.lower, p.upper] and some (C, d) in p.disjuncts,
    C @ f(x) <= d holds row by row. `num_inputs`/`num_outputs`, where given, must equal the
    number of declared X_i/Y_j. Raises ValueError naming the file (and line where it can)
    for anything outside the VNN-COMP subset.
    """
    text = str(source)
    if isinstance(source, os.PathLike) or not text.lstrip().startswith(("(", ";")):
        name, text = text, Path(source).read_text()
    else:
        name = "<vnnlib text>"
    reader = _Reader(_sexprs(text, name), name)
    for kind, expected in (("X", num_inputs), ("Y", num_outputs)):
        if expected is not None and reader.sizes[kind] != expected:
            raise ValueError(f"{name}: declares {reader.sizes[kind]} {kind}_ variables, "
                             f"expected {expected}")
    return reader.properties()


def write_result(path: str | os.PathLike, verdict: str, x=None, y=None) -> None:
    """Write a VNN-COMP result file: the verdict line, and for "sat" the counterexample.

    For "sat", `x` (the input, flattened row-major) and `y` (its output) are required and
    written as `((X_0 v)\\n (X_1 v)\\n ... (Y_0 v) ...)`, one assignment per line.
    Example: `write_result("out.txt", "sat", x=[0.1, 0.2], y=[1.5])`.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    lines = [verdict]
    if verdict == "sat":
        if x is None or y is None:
            raise ValueError("a sat result needs the counterexample x and its output y")
        pairs = [f"({kind}_{i} {float(v)!r})" for kind, values in (("X", x), ("Y", y))
                 for i, v in enumerate(np.ravel(values))]
        lines.append("(" + "\n ".join(pairs) + ")")
    Path(path).write_text("\n".join(lines) + "\n")
