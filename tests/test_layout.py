"""Torch-layout (NCHW) convolutions traced channels-last (jaxlirpa/layout.py): the graph keeps
a layout change only at the model's input and flatten, and the bounds are those of the same
model written channels-last, and sound."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlirpa
from jaxlirpa import graph as graph_lib
from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.testing import assert_sound

K = jax.random.split(jax.random.key(7), 8)
W1 = jax.random.normal(K[0], (4, 3, 3, 3)) * 0.4  # OIHW
B1 = jax.random.normal(K[1], (4,)) * 0.1
W2 = jax.random.normal(K[2], (4, 4, 3, 3)) * 0.3
B2 = jax.random.normal(K[3], (4,)) * 0.1
WD = jax.random.normal(K[4], (5, 4 * 4 * 4)) * 0.2
X = jax.random.uniform(K[5], (2, 3, 6, 6))  # NCHW
EPS = 0.03
METHODS = ("ibp", "crown", "crown-ibp", "forward", "alpha-crown")


def _conv(x, w, stride, padding, layout):
    dn = ("NCHW", "OIHW", "NCHW") if layout == "nchw" else ("NHWC", "HWIO", "NHWC")
    w = w if layout == "nchw" else jnp.transpose(w, (2, 3, 1, 0))
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)


def cnn(x, layout="nchw", act=jax.nn.relu):
    """conv, bias, ReLU, conv, bias, ReLU, flatten (torch's channel-major order), dense."""
    bias = (lambda b: b[None, :, None, None]) if layout == "nchw" else (lambda b: b)
    y = act(_conv(x, W1, 1, "VALID", layout) + bias(B1))
    y = act(_conv(y, W2, 1, "SAME", layout) + bias(B2))
    if layout == "nhwc":
        y = jnp.transpose(y, (0, 3, 1, 2))
    return y.reshape(y.shape[0], -1) @ WD.T


def residual(x):
    """Residual sums of two convolutions' outputs and of a convolution's output and its
    ReLU input (transposed alike), and of a convolution's output and the NCHW input itself."""
    y = jax.nn.relu(_conv(x, W1, 1, "SAME", "nchw"))
    y = jax.nn.relu(_conv(y, W2, 1, "SAME", "nchw") + _conv(y, W2[::-1], 1, "SAME", "nchw"))
    y = jnp.tanh(_conv(y, W2, 1, "SAME", "nchw") + y)
    z = jax.nn.relu(_conv(x, W1[:3], 1, "SAME", "nchw") + x)
    return jnp.concatenate([y.reshape(y.shape[0], -1), z.reshape(z.shape[0], -1)], axis=1)


def _layout_changes(fn):
    graph, _ = graph_lib.trace(fn, [X[:1]], [True])
    convs = [e for e in graph.eqns if e.prim is P.conv_general_dilated_p]
    moves = [e for e in graph.eqns if e.prim is P.transpose_p and graph.is_perturbed(e.inputs[0])]
    return convs, moves


def leaky(x):
    return cnn(x, act=lambda t: jax.nn.leaky_relu(t, 0.1))


@pytest.mark.parametrize("fn", [cnn, leaky], ids=["relu", "leaky_relu"])
def test_torch_layout_convolutions_meet_without_layout_changes(fn):
    convs, moves = _layout_changes(fn)
    channels_last = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    assert len(convs) == 2 and all(tuple(e.params["dimension_numbers"]) == tuple(channels_last) for e in convs)
    assert len(moves) == 2  # the input, the flatten: none between the convolutions


def test_layout_changes_that_do_not_meet_stay():
    convs, moves = _layout_changes(residual)
    assert len(convs) == 5
    # the input (twice: once for the first convolution, once for the last), y's flatten, the
    # last convolution's output back to NCHW for its sum with x
    assert len(moves) == 4


@pytest.mark.parametrize("method", METHODS)
def test_bounds_equal_the_channels_last_models(method):
    ball = jaxlirpa.LinfBall(EPS)
    torch_layout = jaxlirpa.bound(cnn, X, ball, method=method)
    flax_layout = jaxlirpa.bound(lambda x: cnn(jnp.transpose(x, (0, 2, 3, 1)), "nhwc"), X, ball, method=method)
    for got, want in zip((torch_layout.lower, torch_layout.upper), (flax_layout.lower, flax_layout.upper)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, method", [(cnn, m) for m in METHODS] + [(residual, m) for m in METHODS[:4]]
                         + [(leaky, "crown")],
                         ids=[f"cnn-{m}" for m in METHODS] + [f"residual-{m}" for m in METHODS[:4]] + ["leaky-crown"])
def test_sound(fn, method):
    """(alpha-CROWN's pulls are CROWN's: on the residual graph it only cost the suite 14 s.)"""
    assert_sound(fn, X, jaxlirpa.LinfBall(EPS), method=method)


def branched(x, flag):
    """Convolutions inside a ``cond``; the untaken branch (flag 1) takes the ``log`` of
    possibly negative values."""
    h = _conv(x, W1, 1, "SAME", "nchw")
    a = lax.cond(flag > 0, lambda h: jax.nn.relu(_conv(h, W2, 1, "SAME", "nchw")),
                 lambda h: jnp.log(jax.nn.relu(_conv(h, W2, 1, "SAME", "nchw"))), h)
    return a.reshape(a.shape[0], -1)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_branch_chosen_at_run_time(method):
    """The index a tracer of an outer jit: the bounds equal those with it known, and sound."""
    ball = jaxlirpa.LinfBall(EPS)
    b = jax.jit(lambda flag, x: jaxlirpa.bound(lambda z: branched(z, flag), x, ball, method=method))(jnp.int32(1), X)
    ref = assert_sound(lambda z: branched(z, 1), X, ball, method=method)
    np.testing.assert_allclose(b.lower, ref.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.upper, ref.upper, rtol=1e-5, atol=1e-5)
