"""Softmax as a whole (rules/softmax.py, patterns.py).

- the pattern pass fuses ``jax.nn.softmax`` over any axes and the hand-written
  ``exp(x - max) / sum`` forms into ``softmax_p`` (and the fused graph computes the same
  values), but not a shift that varies along the summed axis;
- the interval and both planes hold at points sampled in many random boxes (vertices
  included), and the interval is attained at its corners;
- on the oracle's ``attention`` case, IBP, CROWN and CROWN-IBP equal auto_LiRPA's LSE bounds
  and are at least as tight as its decomposed ('complex') ones; forward is at least as tight
  as both IBPs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlirpa
from jaxlirpa.graph import trace
from jaxlirpa.patterns import softmax_p
from jaxlirpa.rules.softmax import Softmax, softmax_planes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oracle  # noqa: E402

SHAPE = (3, 4)


def _fused(fn):
    graph, consts = trace(fn, [jax.ShapeDtypeStruct(SHAPE, jnp.float32)], [True])
    return graph, consts


FORMS = {
    "last": jax.nn.softmax,
    "axis0": lambda x: jax.nn.softmax(x, axis=0),
    "both": lambda x: jax.nn.softmax(x, axis=(0, 1)),
    "hand": lambda x: jnp.exp(x - x.max(-1, keepdims=True)) / jnp.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True),
    "shared": lambda x: (lambda e: e / e.sum(0))(jnp.exp(x - jax.lax.stop_gradient(x.max(0)))),
    "unshifted": lambda x: jnp.exp(x) / jnp.sum(jnp.exp(x), -1, keepdims=True),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_softmax_forms_fused(name):
    graph, consts = _fused(FORMS[name])
    assert [e.prim for e in graph.eqns] == [softmax_p]
    x = jax.random.normal(jax.random.key(0), SHAPE) * 3
    np.testing.assert_allclose(graph.evaluate(consts, [x])[0], FORMS[name](x), rtol=1e-6, atol=1e-7)


def test_varying_shift_not_fused():
    """``exp(x - s) / sum(exp(x - s'))`` is softmax only when ``s == s'`` is constant along the sum."""
    graph, _ = _fused(lambda x: jnp.exp(x - x[:, :1]) / jnp.sum(jnp.exp(x - x[:1, :]), -1, keepdims=True))
    assert softmax_p not in [e.prim for e in graph.eqns]


def _boxes(n=200, K=5, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, K)) * rng.choice([0.1, 1, 5, 30], size=(n, 1))
    w = rng.uniform(0, 1, (n, K)) * rng.choice([1e-6, 0.1, 1, 5, 40], size=(n, 1))
    w[:10] = 0  # degenerate boxes
    return jnp.asarray(c - w, jnp.float32), jnp.asarray(c + w, jnp.float32)


def test_relaxation_sound_on_random_boxes():
    l, u = _boxes()
    lower, upper = softmax_planes(l, u)
    lo, hi = Softmax().image(l, u, None)
    rng = np.random.default_rng(1)
    t = rng.uniform(size=(300, *l.shape))
    t[:100] = np.round(t[:100])  # vertices
    x = np.asarray(l, np.float64) + (np.asarray(u, np.float64) - np.asarray(l, np.float64)) * t
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    plane = lambda pl: np.einsum("nkj,snj->snk", np.asarray(pl.matrix(), np.float64), x) + np.asarray(pl.bias)
    tol = 2e-6 * (1 + np.abs(x).max(-1, keepdims=True))
    assert np.all(plane(lower) <= p + tol) and np.all(p <= plane(upper) + tol)
    assert np.all(np.asarray(lo) <= p + 1e-6) and np.all(p <= np.asarray(hi) + 1e-6)
    # exact: the lower bound of p_k is p_k at (l_k, u_{j != k}); the upper one at (u_k, l_{j != k})
    eye = np.eye(l.shape[1], dtype=bool)
    corner = np.where(eye[None], np.asarray(l)[:, None], np.asarray(u)[:, None])
    at = jax.nn.softmax(jnp.asarray(corner), -1)[:, np.arange(l.shape[1]), np.arange(l.shape[1])]
    np.testing.assert_allclose(lo, at, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- oracle

needs_oracle = pytest.mark.skipif(not oracle.available(), reason="oracle data not found")
LSE = {"ibp": "IBP", "crown": "CROWN_pure", "crown-ibp": "CROWN-IBP"}
COMPLEX = {"ibp": "IBP_softmax_complex", "crown": "CROWN_softmax_complex", "crown-ibp": "IBP_softmax_complex",
           "forward": "IBP_softmax_complex"}  # no CROWN-IBP or forward references there: IBP


@pytest.fixture(scope="module")
def attention():
    case = oracle.load_case("attention")
    S = case.sets["linf"]
    out = {}
    for method in ("ibp", "crown", "crown-ibp", "forward"):
        b = jaxlirpa.bound(case.fn, jnp.asarray(case.x0), jaxlirpa.LinfBall(S.eps), method=method)
        out[method] = (np.asarray(b.lower).reshape(1, -1), np.asarray(b.upper).reshape(1, -1))
    return S, out


def _compare(S, bounds, ref):
    rl, ru = S.methods[ref]
    lo, hi = bounds
    tol = 2e-5 * float(np.max(ru - rl)) + 1e-6
    return max(np.max(rl - lo), np.max(hi - ru)), max(np.max(lo - rl), np.max(ru - hi)), tol


@needs_oracle
@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "forward"])
def test_attention_against_auto_lirpa(attention, method):
    S, out = attention
    lo, hi = out[method]
    assert np.all(lo <= S.emp_min + 1e-5) and np.all(hi >= S.emp_max - 1e-5)
    if method in LSE:  # the same relaxation: equal
        looser, tighter, tol = _compare(S, out[method], LSE[method])
        assert looser <= tol and tighter <= tol, (looser, tighter, tol)
    if method == "forward":  # auto_LiRPA has no forward softmax: at least as tight as IBP
        assert _compare(S, out[method], "IBP")[0] <= _compare(S, out[method], "IBP")[2]
    looser, _, tol = _compare(S, out[method], COMPLEX[method])
    assert looser <= tol, f"looser than auto_LiRPA's decomposed softmax by {looser:.3g}"
