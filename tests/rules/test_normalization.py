"""Layer and RMS normalisation as a whole (rules/normalization.py, patterns.py).

- flax ``nn.LayerNorm``, the hand-written ``(x - mu) / sqrt(var + eps)`` and RMS norm are fused
  into ``normalize_p`` (centring left linear) and compute the same values;
- the interval and both planes hold at points sampled in random boxes (vertices included);
- with the pattern, bounds of a flax layer norm are narrower on average than the decomposed path's.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlirpa
from jaxlirpa import patterns
from jaxlirpa.graph import trace
from jaxlirpa.patterns import normalize_p
from jaxlirpa.rules.normalization import normalize_image, normalize_planes

LN = nn.LayerNorm()
LN_VARS = jax.tree_util.tree_map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(2), t.shape),
                                 LN.init(jax.random.key(1), jnp.zeros((1, 8))))


def _hand(x):
    z = x - x.mean(-1, keepdims=True)
    return z / jnp.sqrt((z ** 2).mean(-1, keepdims=True) + 1e-5) * 1.5 - 0.2


FORMS = {
    "flax": lambda x: LN.apply(LN_VARS, x),
    "hand": _hand,
    "rms": lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_forms_fused(name):
    graph, consts = trace(FORMS[name], [jax.ShapeDtypeStruct((3, 8), jnp.float32)], [True])
    prims = [e.prim for e in graph.eqns]
    assert prims.count(normalize_p) == 1 and jax.lax.rsqrt_p not in prims and jax.lax.sqrt_p not in prims
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 2
    np.testing.assert_allclose(graph.evaluate(consts, [x])[0], FORMS[name](x), rtol=1e-5, atol=1e-5)


def test_relaxation_sound_on_random_boxes():
    rng = np.random.default_rng(0)
    n, K, eps = 200, 5, 1e-5
    c = rng.normal(size=(n, K)) * rng.choice([0.1, 1, 5], size=(n, 1))
    w = rng.uniform(0, 1, (n, K)) * rng.choice([0, 1e-4, 0.05, 0.5, 3], size=(n, 1))
    l, u = jnp.asarray(c - w, jnp.float32), jnp.asarray(c + w, jnp.float32)
    lower, upper = normalize_planes(l, u, eps)
    lo, hi = normalize_image(l, u, eps)
    t = rng.uniform(size=(300, n, K))
    t[:100] = np.round(t[:100])
    z = np.asarray(l, np.float64) + (np.asarray(u, np.float64) - np.asarray(l, np.float64)) * t
    y = z / np.sqrt(np.mean(z * z, -1, keepdims=True) + eps)
    plane = lambda pl: np.einsum("nkj,snj->snk", np.asarray(pl.W, np.float64), z) + np.asarray(pl.bias)
    tol = 1e-5 * (1 + np.abs(y))
    assert np.all(np.asarray(lo) <= y + tol) and np.all(y <= np.asarray(hi) + tol)
    assert np.all(plane(lower) <= y + tol) and np.all(y <= plane(upper) + tol)
    narrow = np.asarray(w.max(1) < 1e-3)  # narrow boxes: the planes are second-order tight
    assert np.max((plane(upper) - plane(lower))[:, narrow]) < 1e-2


def test_tighter_than_decomposed(monkeypatch):
    W = jax.random.normal(jax.random.key(0), (6, 8)) * 0.8
    fn = lambda x: LN.apply(LN_VARS, x @ W)
    x = jax.random.normal(jax.random.key(3), (2, 6))
    fused = {m: jaxlirpa.bound(fn, x, 0.3, method=m) for m in ("ibp", "crown")}
    monkeypatch.setattr(patterns, "fuse_composites", lambda graph: None)
    apart = {m: jaxlirpa.bound(lambda z: fn(z) * 1.0, x, 0.3, method=m) for m in ("ibp", "crown")}  # new cache key
    for m in fused:
        assert np.all(np.asarray(fused[m].lower) <= fn(x) + 1e-5) and np.all(fn(x) <= np.asarray(fused[m].upper) + 1e-5)
        assert np.mean(fused[m].upper - fused[m].lower) < 0.8 * np.mean(apart[m].upper - apart[m].lower), m
