"""gelu (erf and tanh forms) and silu (rules/gelu.py, patterns.py).

- the pattern pass fuses ``jax.nn.gelu`` (both forms), ``0.5 x (1 + erf(x / sqrt 2))`` and
  ``x * sigmoid(x)``, computing the same values; ``2 x sigmoid(x)`` stays unfused;
- relaxations and images hold on a dense float64 grid over many intervals (narrow, wide,
  one-sided, around the minimum and the inflection points, degenerate) and are exact at points;
- each line encloses the least area with the curve (best at the midpoint among all sound
  lines of a fine grid of slopes);
- the fused image lies inside the decomposed path's IBP interval; CROWN narrower on average.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erfc, expit

import jaxlirpa
from jaxlirpa import patterns
from jaxlirpa.graph import trace
from jaxlirpa.patterns import gelu_p, silu_p
from jaxlirpa.rules.gelu import GeluErf, GeluTanh, Silu

RULES = {
    "erf": (GeluErf(), lambda x: 0.5 * x * erfc(-x / math.sqrt(2))),
    "tanh": (GeluTanh(), lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    "silu": (Silu(), lambda x: x * expit(x)),
}


def _intervals(rule, n=240, seed=0):
    rng = np.random.default_rng(seed)
    specials = [rule.x_min, -rule.c, rule.c, 0.0]
    c = rng.uniform(-8, 8, n)
    w = rng.uniform(0, 1, n) * rng.choice([0, 1e-5, 0.3, 2, 8, 40], n)
    s = rng.choice(specials, n)
    on_special = rng.uniform(size=n) < 0.4
    c = np.where(on_special, s + rng.uniform(-1, 1, n) * w, c)
    return jnp.asarray(c - w, jnp.float32), jnp.asarray(c + w, jnp.float32)


@pytest.mark.parametrize("name", list(RULES))
def test_relaxation_and_image_sound_on_grid(name):
    rule, f64 = RULES[name]
    l, u = _intervals(rule)
    r = jax.jit(rule.relax)(l, u)  # one compile each, where eager ops compile one by one
    lo, hi = jax.jit(rule.image)(l, u)
    l64, u64 = np.asarray(l, np.float64)[:, None], np.asarray(u, np.float64)[:, None]
    x = l64 + (u64 - l64) * np.linspace(0, 1, 4001)[None]
    fx = f64(x)
    lw, lb, uw, ub = (np.asarray(t, np.float64)[:, None] for t in r)
    tol = 2e-6 * (1 + np.abs(x).max(1, keepdims=True))
    assert np.all(lw * x + lb <= fx + tol), name
    assert np.all(fx <= uw * x + ub + tol), name
    assert np.all(np.asarray(lo)[:, None] <= fx + tol) and np.all(fx <= np.asarray(hi)[:, None] + tol), name
    step = np.max(np.abs(np.diff(fx, axis=1)), 1, keepdims=True)  # the grid's resolution
    assert np.all(np.asarray(lo)[:, None] >= fx.min(1, keepdims=True) - tol - step)  # the exact range
    assert np.all(np.asarray(hi)[:, None] <= fx.max(1, keepdims=True) + tol + step)
    point = np.asarray(l == u)
    for w_, b_ in ((lw, lb), (uw, ub)):
        np.testing.assert_allclose((w_ * x + b_)[point, 0], fx[point, 0], rtol=1e-5, atol=1e-5)
    # least area: best at the midpoint among all sound lines (here: a grid of slopes)
    m, xs, fs = (l64 + u64)[:60] / 2, x[:60, ::10], fx[:60, ::10]
    shifted = fs[None] - np.linspace(-0.2, 1.2, 281)[:, None, None] * (xs - m)[None]
    assert np.all(lw[:60] * m + lb[:60] >= shifted.min(2).max(0)[:, None] - tol[:60]), name
    assert np.all(uw[:60] * m + ub[:60] <= shifted.max(2).min(0)[:, None] + tol[:60]), name
    grads = jax.jit(jax.grad(lambda l, u: sum(jnp.sum(t) for t in rule.relax(l, u)), (0, 1)))(l, u)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


FORMS = {
    "gelu_erf": (lambda x: jax.nn.gelu(x, approximate=False), gelu_p),
    "gelu_tanh": (jax.nn.gelu, gelu_p),
    "gelu_hand": (lambda x: 0.5 * x * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0))), gelu_p),
    "silu": (jax.nn.silu, silu_p),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_forms_fused(name):
    fn, prim = FORMS[name]
    graph, consts = trace(fn, [jax.ShapeDtypeStruct((6,), jnp.float32)], [True])
    assert prim in [e.prim for e in graph.eqns] and all(e.prim in (prim, jax.lax.copy_p) for e in graph.eqns)
    x = jnp.linspace(-5, 5, 6)
    np.testing.assert_allclose(graph.evaluate(consts, [x])[0], fn(x), rtol=1e-6, atol=1e-6)


def test_other_scales_not_fused():
    graph, _ = trace(lambda x: 2 * x * jax.nn.sigmoid(x), [jax.ShapeDtypeStruct((6,), jnp.float32)], [True])
    assert silu_p not in [e.prim for e in graph.eqns]


W = jax.random.normal(jax.random.key(0), (6, 8)) * 0.8


def test_tighter_than_decomposed(monkeypatch):
    """IBP: the fused image lies inside the decomposed path's interval on every box (wide,
    narrow, one-sided, crossing); CROWN through a layer: narrower on average. (Not at every
    element: lines of least area need not give the least CROWN bound after a layer.)"""
    l, u = _intervals(RULES["silu"][0], n=120, seed=2)
    fn = lambda x: jax.nn.silu(x @ W) @ W.T
    x = jax.random.normal(jax.random.key(3), (2, 6))
    fused = jaxlirpa.bound(fn, x, 0.3, method="crown")
    monkeypatch.setattr(patterns, "fuse_composites", lambda graph: None)
    apart = jaxlirpa.bound(lambda z: fn(z) * 1.0, x, 0.3, method="crown")  # new cache key
    boxes = jaxlirpa.bound(jax.nn.silu, l[None], jaxlirpa.Box(l[None], u[None]), method="ibp")
    lo, hi = Silu().image(l, u)
    tol = 1e-6 * (1 + np.abs(np.asarray(hi)))  # float32 rounding
    assert np.all(np.asarray(lo) >= np.asarray(boxes.lower[0]) - tol)
    assert np.all(np.asarray(hi) <= np.asarray(boxes.upper[0]) + tol)
    width = lambda b: np.asarray(b.upper - b.lower)
    assert width(fused).mean() < width(apart).mean()
