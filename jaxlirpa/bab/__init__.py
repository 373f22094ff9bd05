"""Complete verification: counterexample search, then branch and bound (beta-CROWN)."""
from jaxlirpa.bab.report import Verdict
from jaxlirpa.bab.verifier import robustness_property, verify

__all__ = ["Verdict", "robustness_property", "verify"]
