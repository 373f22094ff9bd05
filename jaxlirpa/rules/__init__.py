"""Bound rules, one module per primitive family; importing registers them."""
# linear first: bilinear and convex wrap its mul/dot_general/div rules with the nonlinear cases.
from jaxlirpa.rules import linear  # noqa: F401  isort: skip
from jaxlirpa.rules import bilinear, convex, gelu, normalization, periodic, pooling, relu, softmax, sshape  # noqa: F401
from jaxlirpa.rules.base import RULES, ElementwiseRule, Relaxation, Rule, UnsupportedPrimitiveError, register

__all__ = ["RULES", "ElementwiseRule", "Relaxation", "Rule", "UnsupportedPrimitiveError", "register"]
