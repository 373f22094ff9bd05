"""CROWN in stages (jaxlirpa/methods/staged.py): called outside jit, ``bound`` sizes CROWN's
products by the counts of each ReLU layer, read on the host between programs. Its bounds must
be dense CROWN's (the one program ``bound`` runs under jit), and sound."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlirpa
from jaxlirpa import api
from jaxlirpa.testing import assert_sound

K = jax.random.split(jax.random.key(11), 8)
SIZES = (6, 24, 24, 24, 4)
WS = [jax.random.normal(k, (m, n)) / np.sqrt(m) for k, m, n in zip(K, SIZES[:-1], SIZES[1:])]
BS = [jax.random.normal(k, (n,)) * 0.3 for k, n in zip(K[4:], SIZES[1:])]
X = jax.random.uniform(K[7], (3, SIZES[0]))
EPS = 0.15


def mlp(x, shifts=(0.0, 0.0, 0.0)):
    for k, (w, b) in enumerate(zip(WS, BS)):
        x = x @ w + b
        if k < len(WS) - 1:
            x = jax.nn.relu(x + shifts[k])
    return x


def branches(x):
    """A residual join and one ReLU read by two layers; a clipped ReLU (relu6) among them."""
    h = jax.nn.relu(x @ WS[0] + BS[0])
    return (h + jax.nn.relu6(h @ WS[1]) @ WS[2] + jax.nn.relu(h @ WS[1] - 0.2) @ WS[2]) @ WS[3]


@pytest.fixture
def stages(monkeypatch):
    """The column sizes of every staged CROWN call (None: not staged)."""
    found, real = [], api._crown_stages

    def spy(*args):
        out = real(*args)
        found.append(out[1])
        return out

    monkeypatch.setattr(api, "_crown_stages", spy)
    return found


def _dense(fn, x, **kw):
    return jax.jit(lambda x: jaxlirpa.bound(fn, x, EPS, method="crown", **kw))(x)


@pytest.mark.parametrize("case", ["spec", "chunks", "pytree", "branches"])  # pytree: plain outputs too
def test_staged_crown_equals_dense_crown_and_is_sound(case, stages):
    fn, kw = mlp, {}
    if case == "spec":
        kw["spec"] = jaxlirpa.margin_spec(jnp.array([0, 2, 3]), SIZES[-1])
    elif case == "chunks":  # chunks of 2: the last one smaller, each sized by its own counts
        kw["batch_size"] = 2
    elif case == "branches":
        fn = branches
    elif case == "pytree":
        fn = lambda x: {"logits": mlp(x), "hidden": jax.nn.relu(x @ WS[0] + BS[0]) @ WS[1]}  # noqa: E731
    staged = jaxlirpa.bound(fn, X, EPS, method="crown", **kw)
    sizes = [dict(s) for s in stages]
    assert sizes and all(sizes), "CROWN was not staged"
    kept = {key: n for s in sizes for key, n in s.items() if key[0] == "columns"}
    shared = {key: n for s in sizes for key, n in s.items() if key[0] == "shared"}
    assert any(n < key[2] for key, n in kept.items()) and any(shared.values()), sizes  # columns dropped and shared
    dense = _dense(fn, X, **{k: v for k, v in kw.items() if k != "batch_size"})  # chunks change no bound
    for a, b in zip(jax.tree_util.tree_leaves(staged), jax.tree_util.tree_leaves(dense)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if case in ("spec", "branches"):  # (the suite's other eager CROWN soundness tests run staged too)
        assert_sound(fn, X, EPS, method="crown", spec=kw.get("spec"), bounds=staged, n_samples=128)


def test_staged_crown_through_layers_all_active_and_all_inactive(stages):
    """A ReLU layer that passes every input shares all its columns; one that holds every input
    at 0 keeps none (alpha-CROWN, whose sparse passes keep columns the same way, failed on it)."""
    fn = lambda x: mlp(x, shifts=(50.0, -500.0, 0.0))  # noqa: E731
    staged = jaxlirpa.bound(fn, X, EPS, method="crown")
    sizes = dict(stages[-1])
    first, second = sorted({key[1] for key in sizes})  # the third ReLU is not staged: only the output crosses it
    assert sizes[("columns", first, 24)] == sizes[("shared", first, 24)] == 24
    assert sizes[("columns", second, 24)] == sizes[("shared", second, 24)] == 0
    dense = _dense(fn, X)
    np.testing.assert_allclose(staged.lower, dense.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(staged.upper, dense.upper, rtol=1e-5, atol=1e-5)
    assert_sound(fn, X, EPS, method="crown", bounds=staged, n_samples=64)
    alpha = jaxlirpa.bound(fn, X, EPS, method="alpha-crown", alpha=jaxlirpa.AlphaOptions(iterations=3))
    assert_sound(fn, X, EPS, bounds=alpha, n_samples=64)


def test_crown_under_jit_and_on_convolutions_is_not_staged(stages):
    """Traced inputs have no counts to read; a CNN whose ReLUs the patches cross has no
    dense layer after a ReLU that an intermediate pass would cross."""
    _dense(mlp, X)
    assert not stages
    W = jax.random.normal(K[0], (3, 3, 1, 4)) * 0.5
    cnn = lambda x: jnp.sum(jax.nn.relu(jax.lax.conv_general_dilated(  # noqa: E731
        x, W, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))), axis=(1, 2))
    jaxlirpa.bound(cnn, jax.random.uniform(K[1], (1, 5, 5, 1)), EPS, method="crown")
    assert stages == [None]
