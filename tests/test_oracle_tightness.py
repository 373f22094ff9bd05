"""jaxlirpa against auto_LiRPA 0.7.1 on the fixed models of ../shared/oracle.

For every case whose operators the core supports, each method must be sound
(contain the stored sampled and PGD extremes) and never looser than its
auto_LiRPA counterpart beyond float32 tolerance; where both use the same
relaxation the bounds must be equal. The few places where they differ on
purpose are listed in ``TIGHTER`` and ``KNOWN_LOOSER`` with the reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle  # noqa: E402

if not oracle.available():
    pytest.skip(f"oracle data not found at {oracle.ORACLE}", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402

import jaxlirpa  # noqa: E402

REFERENCE = {"ibp": "IBP", "crown": "CROWN_pure", "crown-ibp": "CROWN-IBP", "forward": "Forward"}
CORE_OPS = {"input", "linear", "conv2d", "batchnorm2d", "relu", "leaky_relu", "avgpool2d", "maxpool2d",
            "flatten", "add", "scale"}
# (case, set, method): why jaxlirpa is tighter than auto_LiRPA there.
TIGHTER = {
    ("cnn_small", "l2", "ibp"): "the first conv is bounded through the L2 dual norm, auto_LiRPA uses its box",
    ("cnn_small", "l2", "crown-ibp"): "same: exact first-layer bounds under L2",
    ("cnn_small", "l2", "crown"): "same: auto_LiRPA bounds the first conv by IBP over the L2 ball's box",
    ("cnn_maxpool", "linf", "crown-ibp"): "max-pool ties broken towards the larger upper bound",
    ("cnn_maxpool", "linf", "forward"): "max-pool ties broken towards the larger upper bound",
    ("cnn_maxpool", "linf", "crown"): "ties as above, and a ReLU output feeding a pool takes the ReLU's "
                                       "interval image, not a looser CROWN bound of it",
    ("mlp_leaky_relu", "linf", "forward"): "upper bound: see KNOWN_LOOSER",
}
# (case, set, method): why jaxlirpa is looser there (each is in the closing notes).
KNOWN_LOOSER = {
    ("mlp_leaky_relu", "linf", "forward"):
        "auto_LiRPA's forward mode gives inactive leaky-ReLU neurons slope 0 instead of the negative slope, "
        "which is unsound; with that change our bounds equal its bounds (checked by hand)",
}


def _core_cases():
    out = []
    for name in oracle.case_names():
        case = oracle.load_case(name)
        if {n["op"] for n in case.nodes} <= CORE_OPS:
            out += [(name, s, m) for s in case.sets for m in REFERENCE if REFERENCE[m] in case.sets[s].methods]
    return out


CASES = _core_cases()


def _set(S):
    return jaxlirpa.LinfBall(S.eps) if S.norm == np.inf else jaxlirpa.L2Ball(S.eps)


@pytest.fixture(scope="module")
def computed():
    cache = {}

    def get(name, sname, method):
        key = (name, sname, method)
        if key not in cache:
            case = oracle.load_case(name)
            b = jaxlirpa.bound(case.fn, jnp.asarray(case.x0), _set(case.sets[sname]), method=method, spec=case.C)
            cache[key] = (np.asarray(b.lower).reshape(case.sets[sname].methods["IBP"][0].shape),
                          np.asarray(b.upper).reshape(case.sets[sname].methods["IBP"][0].shape))
        return cache[key]

    return get


@pytest.mark.parametrize("name,sname,method", CASES)
def test_sound_against_stored_extremes(computed, name, sname, method):
    S = oracle.load_case(name).sets[sname]
    lo, hi = computed(name, sname, method)
    tol = 1e-5 * max(1.0, float(np.max(np.abs(S.emp_max))))
    assert np.all(lo <= S.emp_min + tol), np.max(lo - S.emp_min)
    assert np.all(hi >= S.emp_max - tol), np.max(S.emp_max - hi)


@pytest.mark.parametrize("name,sname,method", CASES)
def test_never_looser_equal_where_same(computed, name, sname, method):
    S = oracle.load_case(name).sets[sname]
    rl, ru = S.methods[REFERENCE[method]]
    lo, hi = computed(name, sname, method)
    tol = 2e-5 * float(np.max(ru - rl)) + 1e-6
    looser = max(np.max(rl - lo), np.max(hi - ru))
    tighter = max(np.max(lo - rl), np.max(ru - hi))
    key = (name, sname, method)
    if key in KNOWN_LOOSER:
        pytest.xfail(KNOWN_LOOSER[key])
    assert looser <= tol, f"looser than auto_LiRPA {REFERENCE[method]} by {looser:.3g} (tol {tol:.3g})"
    if key not in TIGHTER:
        assert tighter <= tol, f"differs from auto_LiRPA {REFERENCE[method]} by {tighter:.3g}: same relaxation expected"


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_interm_crown_bounds_match(name):
    """CROWN's pre-activation bounds equal auto_LiRPA's CROWN_pure ones for the first ReLU layer."""
    case = oracle.load_case(name)
    S = case.sets["linf"]
    first = next(n for n in case.nodes if n["op"] in ("relu", "leaky_relu"))
    rl, ru = S.interm["CROWN_pure"][first["id"]]
    fn = lambda x: oracle.load_case(name).activations(x)[case.interm_inputs[first["id"]]]
    b = jaxlirpa.bound(fn, jnp.asarray(case.x0), _set(S), method="crown")
    tol = 2e-5 * float(np.max(ru - rl)) + 1e-6
    np.testing.assert_allclose(np.asarray(b.lower), rl, atol=tol)
    np.testing.assert_allclose(np.asarray(b.upper), ru, atol=tol)
