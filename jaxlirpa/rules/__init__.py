"""Bound rules, one module per primitive family; importing registers them."""
from jaxlirpa.rules import linear, pooling, relu  # noqa: F401
from jaxlirpa.rules.base import RULES, ElementwiseRule, Relaxation, Rule, UnsupportedPrimitiveError, register

__all__ = ["RULES", "ElementwiseRule", "Relaxation", "Rule", "UnsupportedPrimitiveError", "register"]
