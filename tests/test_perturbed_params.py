"""Bounds over any pytree: perturbed model parameters (weight perturbation, the
"Beyond" of auto_LiRPA), chosen leaves only, parameters and inputs together.

Soundness is checked on the same function written over one flat vector
(``ravel_pytree``), where ``assert_sound`` samples and attacks points: the
pytree's bounds must contain them. The flat function's own bounds must equal
the pytree's, since both trace to the same graph up to reshapes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxlirpa
from jaxlirpa.testing import assert_sound

from gradcheck import assert_grad_matches_finite_differences

METHODS = ["ibp", "crown", "crown-ibp", "forward", "alpha-crown"]
EPS = 0.02


class SmallCNN(nn.Module):
    """A conv (bilinear in input and kernel once both move), a ReLU, two dense layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


MODEL = SmallCNN()
X = jax.random.uniform(jax.random.key(0), (2, 4, 4, 2))
PARAMS = MODEL.init(jax.random.key(1), X)


def apply(params):
    return MODEL.apply(params, X)


def _flat_check(fn_of_tree, tree, eps_tree, bounds, method=None):
    """``bounds`` contain ``fn_of_tree`` at sampled and attacked points of the set,
    checked on the flat function; returns the flat function's own bounds by ``method``."""
    z, unravel = ravel_pytree(tree)
    eps, _ = ravel_pytree(jax.tree_util.tree_map(lambda e, leaf: jnp.broadcast_to(e, leaf.shape).astype(leaf.dtype),
                                                 eps_tree, tree))
    flat = lambda zb: fn_of_tree(unravel(zb[0])).reshape(1, -1)
    as_flat = jaxlirpa.Bounds(bounds.lower.reshape(1, -1), bounds.upper.reshape(1, -1))
    assert_sound(flat, z[None], jaxlirpa.LinfBall(eps[None]), bounds=as_flat, n_samples=128, attack_steps=10)
    return method and jaxlirpa.bound(flat, z[None], jaxlirpa.LinfBall(eps[None]), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_weight_perturbation_sound_and_equal_to_the_flat_function(method):
    alpha = jaxlirpa.AlphaOptions(iterations=5) if method == "alpha-crown" else None
    b = jaxlirpa.bound(apply, PARAMS, EPS, method=method, alpha=alpha)
    assert b.lower.shape == b.upper.shape == (2, 3)
    eps_tree = jax.tree_util.tree_map(lambda _: EPS, PARAMS)
    if method == "alpha-crown":  # an optimisation: the same problem, not the same iterates
        _flat_check(apply, PARAMS, eps_tree, b)
        crown = jaxlirpa.bound(apply, PARAMS, EPS, method="crown")
        assert jnp.all(b.lower >= crown.lower - 1e-5) and jnp.all(b.upper <= crown.upper + 1e-5)
        return
    flat = _flat_check(apply, PARAMS, eps_tree, b, method)
    tol = 1e-4 * float(jnp.max(b.upper - b.lower))
    np.testing.assert_allclose(b.lower.reshape(1, -1), flat.lower, atol=tol)
    np.testing.assert_allclose(b.upper.reshape(1, -1), flat.upper, atol=tol)


def test_only_chosen_leaves_move():
    kernels = jaxlirpa.perturb_leaves(PARAMS, EPS, lambda path, leaf: path.endswith("kernel"))
    assert kernels["params"]["Dense_0"] == {"kernel": EPS, "bias": None}
    b = jaxlirpa.bound(apply, PARAMS, kernels)
    eps_tree = jax.tree_util.tree_map(lambda s, leaf: 0.0 if s is None else s, kernels, PARAMS,
                                      is_leaf=lambda s: s is None)
    _flat_check(apply, PARAMS, eps_tree, b)
    everything = jaxlirpa.bound(apply, PARAMS, EPS)
    assert jnp.all(b.lower >= everything.lower - 1e-6) and jnp.all(b.upper <= everything.upper + 1e-6)
    assert jnp.any(b.upper - b.lower < everything.upper - everything.lower - 1e-4)


def test_parameters_and_inputs_together_with_their_own_sets():
    fn = lambda tree: MODEL.apply(tree[0], tree[1])
    sets = (jaxlirpa.LinfBall(0.01), jaxlirpa.LinfBall(0.05, lower=0.0, upper=1.0))
    b = jaxlirpa.bound(fn, (PARAMS, X), sets, method="crown")
    eps_tree = (jax.tree_util.tree_map(lambda _: 0.01, PARAMS), jnp.full(X.shape, 0.05))
    # the flat check's set is the unclipped box: it holds the clipped one, so containment still applies
    z, unravel = ravel_pytree((PARAMS, X))
    eps, _ = ravel_pytree(jax.tree_util.tree_map(lambda e, leaf: jnp.broadcast_to(e, leaf.shape), eps_tree, (PARAMS, X)))
    lo = jnp.where(jnp.arange(z.size) >= z.size - X.size, jnp.maximum(z - eps, 0.0), z - eps)
    hi = jnp.where(jnp.arange(z.size) >= z.size - X.size, jnp.minimum(z + eps, 1.0), z + eps)
    flat = lambda zb: fn(unravel(zb[0])).reshape(1, -1)
    as_flat = jaxlirpa.Bounds(b.lower.reshape(1, -1), b.upper.reshape(1, -1))
    assert_sound(flat, z[None], jaxlirpa.Box(lo[None], hi[None]), bounds=as_flat, n_samples=128, attack_steps=10)


def test_spec_on_the_whole_output():
    C = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    b = jaxlirpa.bound(apply, PARAMS, EPS, method="crown", spec=C)
    plain = jaxlirpa.bound(apply, PARAMS, EPS, method="crown")
    pos, neg = jnp.maximum(C, 0), jnp.minimum(C, 0)
    via_output = pos @ plain.lower.reshape(-1) + neg @ plain.upper.reshape(-1)
    assert b.lower.shape == (4,) and jnp.all(b.lower >= via_output - 1e-5)
    y = C @ apply(PARAMS).reshape(-1)
    assert jnp.all(b.lower <= y) and jnp.all(y <= b.upper)


def test_jit_and_grad_through_parameter_bounds():
    loss = lambda params: jnp.sum(jaxlirpa.bound(apply, params, EPS, method="crown").upper)
    np.testing.assert_allclose(jax.jit(loss)(PARAMS), loss(PARAMS), rtol=1e-5)
    w, unravel = ravel_pytree(PARAMS)
    assert_grad_matches_finite_differences(jax.jit(lambda v: loss(unravel(v))), w, directions=2)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="No leaf of x is perturbed"):
        jaxlirpa.bound(apply, PARAMS, jax.tree_util.tree_map(lambda _: None, PARAMS))
    with pytest.raises(ValueError, match="prefix of x's pytree"):
        jaxlirpa.bound(apply, PARAMS, {"other": EPS})
    with pytest.raises(TypeError, match="only floating-point leaves"):
        jaxlirpa.bound(lambda t: t["w"] * t["n"], {"w": jnp.ones(3), "n": jnp.arange(3)}, 0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        jaxlirpa.bound(apply, PARAMS, -0.1)
    with pytest.raises(ValueError, match="no batch axis"):
        jaxlirpa.bound(apply, PARAMS, EPS, spec=jnp.ones((1, 2, 6)))
    with pytest.raises(ValueError, match="batch_size"):
        jaxlirpa.bound(apply, PARAMS, EPS, batch_size=2)
