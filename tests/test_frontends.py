"""One ``jaxlirpa.bound`` call for every way of writing a model: flax.linen, flax.nnx
(called directly, and through ``nnx.split``/``nnx.merge``), equinox, a plain function.

The same weights go into each front-end, so each must give the plain function's
bounds and gradients, and every bound must contain the model's outputs on the set."""
from __future__ import annotations

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlirpa
from jaxlirpa.testing import assert_sound, sample_points

W1 = jax.random.normal(jax.random.key(1), (6, 8))
B1 = jax.random.normal(jax.random.key(2), (8,))
W2 = jax.random.normal(jax.random.key(3), (8, 3))
B2 = jax.random.normal(jax.random.key(4), (3,))
X = jax.random.uniform(jax.random.key(5), (3, 6))
EPS = 0.1
METHODS = ["ibp", "crown-ibp", "crown"]


def plain(x, w1=W1, w2=W2):
    return jax.nn.relu(x @ w1 + B1) @ w2 + B2


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def linen_params(w1=W1, w2=W2):
    return {"params": {"hidden": {"kernel": w1, "bias": B1}, "out": {"kernel": w2, "bias": B2}}}


def nnx_model() -> NnxMLP:
    model = NnxMLP(nnx.Rngs(0))
    for layer, w, b in ((model.hidden, W1, B1), (model.out, W2, B2)):
        layer.kernel[...], layer.bias[...] = w, b
    return model


def eqx_model():
    """equinox's MLP (one example in, one out), weights stored ``(out, in)``; skips without equinox."""
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(6, 3, 8, depth=1, activation=jax.nn.relu, key=jax.random.key(0))
    leaves = lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[1].bias)
    return eqx.tree_at(leaves, mlp, (W1.T, B1, W2.T, B2))


FRONTENDS = ["plain", "linen", "nnx", "nnx-merge", "equinox"]


def frontend(name: str):
    """One front-end as a function of a batch, computing ``plain``."""
    if name == "equinox":
        return jax.vmap(eqx_model())
    if name == "nnx":
        return nnx_model()  # the module itself is the function
    if name == "nnx-merge":
        graphdef, state = nnx.split(nnx_model())
        return lambda x: nnx.merge(graphdef, state)(x)
    return {"plain": plain, "linen": lambda x: LinenMLP().apply(linen_params(), x)}[name]


@pytest.fixture(scope="module")
def reference() -> dict:
    return {m: jaxlirpa.bound(plain, X, EPS, method=m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FRONTENDS)
def test_same_bounds_and_sound(reference, name, method):
    fn = frontend(name)
    np.testing.assert_allclose(fn(X), plain(X), rtol=1e-5, atol=1e-5)
    b = jaxlirpa.bound(fn, X, EPS, method=method)
    np.testing.assert_allclose(b.lower, reference[method].lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.upper, reference[method].upper, rtol=1e-5, atol=1e-5)
    points = sample_points(EPS, X, jax.random.key(0), 64)  # point 0 is X itself
    outputs = jax.vmap(fn)(points)
    assert np.all(outputs >= b.lower - 1e-5) and np.all(outputs <= b.upper + 1e-5)


@pytest.mark.parametrize("name", FRONTENDS)
def test_attacked_points_stay_inside(name):
    """Gradient-attacked points of every front-end (one method: the bounds are equal)."""
    assert_sound(frontend(name), X, EPS, method="crown", n_samples=32, attack_steps=10)


def _bound_sum(fn, x):
    return jnp.sum(jaxlirpa.bound(fn, x, EPS, method="crown-ibp").lower)


@pytest.fixture(scope="module")
def plain_grads():
    """The bound sum of the plain function and its gradients with respect to W1 and W2."""
    grads = jax.jit(jax.grad(lambda w1, w2: _bound_sum(lambda x: plain(x, w1, w2), X), argnums=(0, 1)))(W1, W2)
    return _bound_sum(plain, X), *grads


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_jit_and_grad_through_flax(plain_grads):
    """Bounds inside jit, and gradients of a bound with respect to the linen and nnx
    parameters: equal to the plain function's."""
    expected, g1, g2 = plain_grads

    linen_loss = lambda p: _bound_sum(lambda x: LinenMLP().apply(p, x), X)
    close(jax.jit(linen_loss)(linen_params()), expected)
    g = jax.grad(linen_loss)(linen_params())["params"]
    close(g["hidden"]["kernel"], g1)
    close(g["out"]["kernel"], g2)

    graphdef, params, rest = nnx.split(nnx_model(), nnx.Param, ...)
    nnx_loss = lambda p: _bound_sum(lambda x: nnx.merge(graphdef, p, rest)(x), X)
    close(jax.jit(nnx_loss)(params), expected)
    g = jax.grad(nnx_loss)(params)
    close(g["hidden"]["kernel"][...], g1)
    close(g["out"]["kernel"][...], g2)
    g = nnx.grad(lambda m: _bound_sum(m, X))(nnx_model())  # nnx's own transform on the module
    close(g["hidden"]["kernel"][...], g1)


def test_jit_and_grad_through_equinox(plain_grads):
    """The same under equinox's filtered jit and grad."""
    expected, g1, g2 = plain_grads
    eqx = pytest.importorskip("equinox")
    eqx_loss = lambda m: _bound_sum(jax.vmap(m), X)
    close(eqx.filter_jit(eqx_loss)(eqx_model()), expected)
    g = eqx.filter_grad(eqx_loss)(eqx_model())
    close(g.layers[0].weight, g1.T)
    close(g.layers[1].weight, g2.T)


class NnxConvNet(nnx.Module):
    """Convolution, batch norm, dropout: layers whose inference mode is what gets bounded."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.norm(self.conv(x))))
        return self.out(h.reshape(h.shape[0], -1))


def test_nnx_inference_mode_is_bounded_and_training_mode_refused():
    model = NnxConvNet(nnx.Rngs(0))
    model.norm.mean[...] = jax.random.normal(jax.random.key(6), (4,))  # non-trivial running statistics
    model.norm.var[...] = jax.random.uniform(jax.random.key(7), (4,), minval=0.5, maxval=2.0)
    images = jax.random.uniform(jax.random.key(8), (2, 8, 8, 1))
    mean_before = np.asarray(model.norm.mean[...])
    # Training mode would normalise each example by its own statistics and update them:
    # flax refuses to mutate batch statistics from inside jaxlirpa's trace.
    with pytest.raises(flax.errors.TraceContextError):
        jaxlirpa.bound(model, images, 0.05)
    np.testing.assert_array_equal(model.norm.mean[...], mean_before)
    model.eval()  # running statistics, no dropout: an affine map between conv and relu
    assert_sound(model, images, 0.05, method="crown", n_samples=32, attack_steps=10)
