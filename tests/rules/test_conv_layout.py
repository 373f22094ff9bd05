"""The linear rule computes every convolution channels-last (rules/linear.py, fast on
XLA's CPU backend inside loops too): same values and same VJPs as the layout asked for."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxlirpa.rules.linear import channels_last_conv, conv_pullback

RNG = np.random.default_rng(0)
CASES = [  # lhs shape, rhs shape, dimension numbers, other parameters
    ((2, 3, 9, 9), (8, 3, 3, 3), ("NCHW", "OIHW", "NCHW"), dict(window_strides=(2, 2), padding=((1, 2), (0, 1)))),
    ((2, 9, 9, 3), (3, 3, 3, 8), ("NHWC", "HWIO", "NHWC"), dict(window_strides=(1, 1), padding="SAME")),
    ((2, 4, 9, 9), (8, 2, 3, 3), ("NCHW", "OIHW", "NCHW"),
     dict(window_strides=(1, 1), padding="VALID", feature_group_count=2, rhs_dilation=(2, 1))),
    ((2, 9, 3, 9), (3, 8, 3, 3), ("NHCW", "HOIW", "NWHC"),
     dict(window_strides=(1, 2), padding=((0, 0), (1, 1)), lhs_dilation=(2, 1))),
    ((2, 3, 11), (5, 3, 3), ("NCH", "OIH", "NCH"), dict(window_strides=(2,), padding="VALID")),
    ((1, 2, 5, 5, 5), (4, 2, 2, 2, 2), ("NCDHW", "OIDHW", "NCDHW"), dict(window_strides=(1, 1, 1), padding="VALID")),
]


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims,kw", CASES)
def test_channels_last_conv_equals_the_layout_asked_for(lhs_shape, rhs_shape, dims, kw):
    x = jnp.asarray(RNG.normal(size=lhs_shape), jnp.float32)
    w = jnp.asarray(RNG.normal(size=rhs_shape), jnp.float32)
    asked = lambda a: lax.conv_general_dilated(a, w, dimension_numbers=dims, **kw)
    params = jax.make_jaxpr(asked)(x).eqns[0].params
    ours = lambda a: channels_last_conv(a, w, **params)
    want, pull_want = jax.vjp(asked, x)
    got, pull_got = jax.vjp(ours, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    cotangent = jnp.asarray(RNG.normal(size=want.shape), jnp.float32)
    np.testing.assert_allclose(pull_got(cotangent)[0], pull_want(cotangent)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims,kw", CASES)
def test_conv_pullback_and_its_gradients_equal_the_plain_vjp(lhs_shape, rhs_shape, dims, kw):
    """CROWN's pull through a convolution (its transpose, kernel laid out for speed both
    ways) equals the plain VJP, and so do its own VJPs with respect to the pulled rows and
    to the kernel (alpha-CROWN's and certified training's gradients)."""
    x = jnp.asarray(RNG.normal(size=lhs_shape), jnp.float32)
    w = jnp.asarray(RNG.normal(size=rhs_shape), jnp.float32)
    asked = lambda a, k: lax.conv_general_dilated(a, k, dimension_numbers=dims, **kw)
    eqn = jax.make_jaxpr(asked)(x, w).eqns[0]
    plain = lambda A, k: jax.vjp(lambda a: asked(a, k), x)[1](A)[0]
    ours = lambda A, k: conv_pullback(eqn.params, eqn.invars[0].aval, k)(A)[0]
    A = jnp.asarray(RNG.normal(size=eqn.outvars[0].aval.shape), jnp.float32)
    want, grads_want = jax.vjp(plain, A, w)
    got, grads_got = jax.vjp(ours, A, w)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    g = jnp.asarray(RNG.normal(size=want.shape), jnp.float32)
    for a, b in zip(grads_got(g), grads_want(g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
