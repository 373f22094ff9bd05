"""jaxlirpa: provable bounds on the outputs of JAX functions (IBP, CROWN, forward LiRPA, CROWN-IBP,
alpha-CROWN) and complete verification (beta-CROWN branch and bound)."""
from jaxlirpa import rules as _rules  # noqa: F401  (registers the built-in rules)
from jaxlirpa import grafting, training
from jaxlirpa.allocator import reuse_freed_memory
from jaxlirpa.api import Bounds, bound, compiler_options, margin_spec, verified, verified_accuracy
from jaxlirpa.bab import Verdict, robustness_property, verify
from jaxlirpa.methods.alpha_crown import AlphaOptions
from jaxlirpa.rules.base import ElementwiseRule, Relaxation, Rule, UnsupportedPrimitiveError
from jaxlirpa.rules.base import register as _register
from jaxlirpa.rules.linear import LINEAR
from jaxlirpa.sets import Box, L1Ball, L2Ball, LinfBall, perturb_leaves


def register_rule(primitive, rule: Rule) -> None:
    """Teach jaxlirpa a primitive it lacks. ``rule`` is ``jaxlirpa.LINEAR`` for a
    primitive linear in its operands, or an :class:`ElementwiseRule` subclass
    instance giving ``image`` and ``relax``. See README, "Adding a rule"."""
    _register(rule, primitive)


__all__ = [
    "AlphaOptions", "Bounds", "Box", "ElementwiseRule", "L1Ball", "L2Ball", "LINEAR", "LinfBall", "Relaxation", "Rule",
    "UnsupportedPrimitiveError", "Verdict", "bound", "compiler_options", "margin_spec", "perturb_leaves", "register_rule", "reuse_freed_memory", "robustness_property",
    "grafting", "training", "verified", "verified_accuracy", "verify",
]
