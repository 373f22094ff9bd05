"""Layer and RMS normalisation as a whole (rules/normalization.py, patterns.py).

- flax ``nn.LayerNorm``, the hand-written ``(x - mu) / sqrt(var + eps)`` and RMS norm are fused
  into ``normalize_p(z, var)`` (centring left linear, the graph's variance kept) and compute the
  same values;
- the interval and both planes hold at points sampled in random boxes (vertices included), with
  the variance's interval as tight as the samples allow;
- on dense -> norm at eps 0.03, 0.1 and 0.3 the fused rule is never looser than the decomposed
  path: IBP at every element, CROWN on average at each eps and at all but a few elements, and
  its bounds hold at sampled and attacked points.
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
from jaxlirpa.rules.normalization import normalize_interval, normalize_planes
from jaxlirpa.testing import assert_sound

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
EPS = (0.03, 0.1, 0.3)
COMPARED = ("flax", "rms")  # the hand-written form fuses to the same primitive (test_forms_fused)


@pytest.mark.parametrize("name", list(FORMS))
def test_forms_fused(name):
    graph, consts = trace(FORMS[name], [jax.ShapeDtypeStruct((3, 8), jnp.float32)], [True])
    fused = [e for e in graph.eqns if e.prim is normalize_p]
    assert len(fused) == 1 and [tuple(a.shape) for a in fused[0].in_avals] == [(3, 8), (3, 1)]
    assert not {jax.lax.rsqrt_p, jax.lax.sqrt_p} & {e.prim for e in graph.eqns}
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 2
    np.testing.assert_allclose(graph.evaluate(consts, [x])[0], FORMS[name](x), rtol=1e-5, atol=1e-5)


def test_relaxation_sound_on_random_boxes():
    rng = np.random.default_rng(0)
    n, K, eps = 200, 5, 1e-5
    c = rng.normal(size=(n, K)) * rng.choice([0.1, 1, 5], size=(n, 1))
    w = rng.uniform(0, 1, (n, K)) * rng.choice([0, 1e-4, 0.05, 0.5, 3], size=(n, 1))
    l, u = c - w, c + w
    t = rng.uniform(size=(300, n, K))
    t[:100] = np.round(t[:100])
    z = l + (u - l) * t
    s = np.mean(z * z, -1, keepdims=True)
    s_lo, s_hi = s.min(0), s.max(0)  # the variance's interval: as tight as the samples allow
    args = [jnp.asarray(a, jnp.float32) for a in (l, u, s_lo, s_hi)]
    lower, upper = jax.jit(normalize_planes, static_argnums=4)(*args, eps)  # one compile, not one per op
    lo, hi = jax.jit(normalize_interval, static_argnums=4)(*args, eps)
    y = z / np.sqrt(s + eps)
    plane = lambda p: (np.einsum("nkj,snj->snk", np.asarray(p.W, np.float64), z) + np.asarray(p.c) * s
                       + np.asarray(p.bias))
    tol = 1e-5 * (1 + np.abs(y))
    assert np.all(np.asarray(lo) <= y + tol) and np.all(y <= np.asarray(hi) + tol)
    assert np.all(plane(lower) <= y + tol) and np.all(y <= plane(upper) + tol)
    narrow = np.asarray(w.max(1) < 1e-3)  # narrow boxes: the planes are second-order tight
    assert np.max((plane(upper) - plane(lower))[:, narrow]) < 1e-2


@pytest.fixture(scope="module")
def dense_norm_bounds():
    """Fused and decomposed bounds of dense -> norm, every form one output of one function (one
    call per method and path; the eps is per example), and that function and its inputs."""
    W = jax.random.normal(jax.random.key(0), (6, 8)) * 0.8
    x = jnp.tile(jax.random.normal(jax.random.key(3), (2, 6)), (len(EPS), 1))
    eps = jnp.repeat(jnp.asarray(EPS), 2)[:, None]
    fn = lambda x: {name: FORMS[name](x @ W) for name in COMPARED}
    real, found = patterns.fuse_composites, {}
    try:
        for fuse in (True, False):
            patterns.fuse_composites = real if fuse else (lambda graph: None)
            g = fn if fuse else (lambda x: jax.tree_util.tree_map(lambda y: y * 1.0, fn(x)))  # a new cache key
            found[fuse] = {m: jaxlirpa.bound(g, x, eps, method=m) for m in ("ibp", "crown")}
    finally:
        patterns.fuse_composites = real
    return found, fn, x, eps


@pytest.mark.parametrize("name", COMPARED)
def test_never_looser_than_decomposed(dense_norm_bounds, name):
    found, fn, x, eps = dense_norm_bounds
    pick = lambda b: jaxlirpa.Bounds(b.lower[name], b.upper[name])
    fused, apart = ({m: pick(b) for m, b in found[fuse].items()} for fuse in (True, False))
    width = lambda b: np.asarray(b.upper - b.lower).reshape(len(EPS), -1)
    scale = 1 + np.abs(np.asarray(apart["ibp"].lower)) + np.abs(np.asarray(apart["ibp"].upper))
    assert np.all(np.asarray(fused["ibp"].lower) >= np.asarray(apart["ibp"].lower) - 1e-6 * scale)
    assert np.all(np.asarray(fused["ibp"].upper) <= np.asarray(apart["ibp"].upper) + 1e-6 * scale)
    f, d = width(fused["crown"]), width(apart["crown"])
    assert np.all(f.mean(1) < d.mean(1)), (f.mean(1), d.mean(1))
    assert np.mean(f > d + 1e-4) <= 0.1 and np.max(f - d) < 0.1 * np.max(d), np.max(f - d)
    # CROWN's bounds are the tighter, so the stronger check; IBP's interval is checked on
    # random boxes above and by the soundness suite's composite case.
    assert_sound(lambda x: fn(x)[name], x, eps, method="crown", bounds=fused["crown"], n_samples=64, attack_steps=10)
