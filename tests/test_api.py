"""The public API: validation errors, jit, grad, vmap, specs, pytrees, user rules."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlirpa
import jaxlirpa.testing
from gradcheck import assert_grad_matches_finite_differences
from jaxlirpa.methods import METHODS
from jaxlirpa.rules.base import RULES
from jaxlirpa.rules.relu import MaxWithConstant

KEY = jax.random.key(0)
W1 = jax.random.normal(jax.random.key(1), (4, 8))
W2 = jax.random.normal(jax.random.key(2), (8, 3))
X = jax.random.normal(jax.random.key(3), (2, 4))


def mlp(x, w1=W1, w2=W2):
    return jax.nn.relu(x @ w1) @ w2


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps_is_a_value_error(eps):
    with pytest.raises(ValueError, match="eps"):
        jaxlirpa.bound(mlp, X, eps)


@pytest.mark.parametrize("bad", [
    dict(x=X.at[0, 0].set(jnp.nan), match="NaN"),
    dict(x=X, eps=jnp.ones((3,)), match="broadcast"),
    dict(x=X, method="crown-magic", match="Unknown method"),
    dict(x=X, spec=jnp.ones((2, 5)), match="spec"),
    dict(x=X, spec=jnp.ones((3, 2, 3)), match="spec"),
    dict(x=X, eps=jaxlirpa.Box(X + 1, X), match="lower must be <="),
])
def test_bad_inputs_are_value_errors(bad):
    bad = dict(bad)
    match = bad.pop("match")
    x, eps = bad.pop("x"), bad.pop("eps", 0.1)
    with pytest.raises(ValueError, match=match):
        jaxlirpa.bound(mlp, x, eps, **bad)


def test_centre_outside_the_domain_is_a_value_error():
    with pytest.raises(ValueError, match="outside"):
        jaxlirpa.bound(mlp, X, jaxlirpa.LinfBall(0.1, lower=0.0, upper=1.0))


def test_type_errors():
    with pytest.raises(TypeError, match="floating"):
        jaxlirpa.bound(mlp, jnp.ones((2, 4), jnp.int32), 0.1)
    with pytest.raises(TypeError, match="set"):
        jaxlirpa.bound(mlp, X, "0.1")


def test_fn_must_keep_the_batch_axis():
    with pytest.raises(ValueError, match="batch"):
        jaxlirpa.bound(lambda x: jnp.sum(mlp(x)), X, 0.1)


def test_unsupported_primitive_names_primitive_and_user_line():
    def model(x):
        return jnp.sinh(x @ W1)  # line named in the error

    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError) as err:
        jaxlirpa.bound(model, X, 0.1)
    msg = str(err.value)
    assert "sinh" in msg and "test_api.py" in msg and "register_rule" in msg and "(1, 8)" in msg


def test_unsupported_primitive_inside_a_flax_module_names_the_modules_line():
    """``jnp.sort`` is a jitted library function: its equation's own (truncated) traceback
    has no user frame, so the line comes from the enclosing call."""
    class Sorted(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.sort(nn.Dense(4)(x), axis=-1)  # line named in the error

    model = Sorted()
    params = model.init(KEY, X)
    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError, match="sort") as err:
        jaxlirpa.bound(lambda x: model.apply(params, x), X, 0.1)
    line = next(i for i, text in enumerate(open(__file__), 1) if "line named in the error" in text and "sort" in text)
    assert f"test_api.py:{line} " in str(err.value)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_reuse_freed_memory_keeps_freed_blocks_mapped():
    """After ``reuse_freed_memory``, a large block freed and allocated again is not faulted in
    page by page a second time (glibc would unmap it on free and map fresh pages)."""
    assert jaxlirpa.reuse_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    size = 32 * 2**20

    def faults_touching_a_new_block():
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, size)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        libc.free(block)
        return after - before

    faults_touching_a_new_block()
    assert faults_touching_a_new_block() < size // resource.getpagesize() // 10


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "forward"])
def test_jit_equals_eager_and_contains_centre(method):
    eager = jaxlirpa.bound(mlp, X, 0.1, method=method)
    jitted = jax.jit(lambda x: jaxlirpa.bound(mlp, x, 0.1, method=method),
                     compiler_options=jaxlirpa.compiler_options(method))(X)
    np.testing.assert_allclose(eager.lower, jitted.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager.upper, jitted.upper, rtol=1e-5, atol=1e-5)
    y = mlp(X)
    assert eager.lower.shape == y.shape and np.all(eager.lower <= y + 1e-5) and np.all(y <= eager.upper + 1e-5)


def test_compiler_options_name_a_method():
    """IBP keeps XLA's defaults; a backward method on CPU compiles without YNNPACK fusions;
    an unknown method is an error, as in ``bound``."""
    assert jaxlirpa.compiler_options("IBP") is None
    if jax.default_backend() == "cpu":
        assert jaxlirpa.compiler_options("crown") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    with pytest.raises(ValueError, match="Unknown method"):
        jaxlirpa.compiler_options("crown-magic")


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "forward"])
def test_grad_through_bounds_matches_finite_differences(method):
    def loss(w1):
        b = jaxlirpa.bound(lambda x: mlp(x, w1), X, 0.05, method=method)
        return jnp.sum(b.upper - b.lower) + jnp.sum(b.lower ** 2)

    assert_grad_matches_finite_differences(loss, W1, directions=3)


def test_vmap_over_bound_and_eps_array():
    eps = jnp.array([0.01, 0.2])[:, None]
    b = jaxlirpa.bound(mlp, X, eps)
    one = jaxlirpa.bound(mlp, X[:1], 0.01)
    np.testing.assert_allclose(b.lower[:1], one.lower, rtol=1e-5)
    stacked = jax.vmap(lambda x: jaxlirpa.bound(mlp, x, 0.1).lower)(jnp.stack([X, X]))
    np.testing.assert_allclose(stacked[0], stacked[1])


def test_margin_spec_rows():
    C = jaxlirpa.margin_spec(jnp.array([0, 2]), 3)
    np.testing.assert_array_equal(C[0], [[1, -1, 0], [1, 0, -1]])
    np.testing.assert_array_equal(C[1], [[-1, 0, 1], [0, -1, 1]])


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "forward"])
def test_spec_is_at_least_as_tight_as_bounding_outputs(method):
    C = jaxlirpa.margin_spec(jnp.array([0, 1]), 3)
    spec = jaxlirpa.bound(mlp, X, 0.1, method=method, spec=C)
    plain = jaxlirpa.bound(mlp, X, 0.1, method=method)
    naive = jnp.einsum("brk,bk->br", jnp.maximum(C, 0), plain.lower) + jnp.einsum("brk,bk->br", jnp.minimum(C, 0), plain.upper)
    assert spec.lower.shape == (2, 2)
    assert np.all(spec.lower >= naive - 1e-5)
    assert np.all(spec.lower <= jnp.einsum("brk,bk->br", C, mlp(X)) + 1e-5)


def test_bounds_is_a_pytree():
    b = jaxlirpa.bound(mlp, X, 0.1)
    assert len(jax.tree_util.tree_leaves(b)) == 2


def test_flax_module_closure():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), strides=2)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    x = jax.random.uniform(KEY, (2, 8, 8, 1))
    params = Net().init(KEY, x)
    fn = lambda x: Net().apply(params, x)
    b = jaxlirpa.bound(fn, x, jaxlirpa.LinfBall(0.05, lower=0.0, upper=1.0), method="crown")
    y = fn(x)
    assert np.all(b.lower <= y + 1e-5) and np.all(y <= b.upper + 1e-5)


def test_output_independent_of_input_is_exact():
    b = jaxlirpa.bound(lambda x: jnp.zeros((x.shape[0], 3)) + 2.0, X, 0.1)
    np.testing.assert_allclose(b.lower, 2.0)
    np.testing.assert_allclose(b.upper, 2.0)


# A user primitive and its rules, registered through the public API.
double_p = jax.extend.core.Primitive("test_double")
double_p.def_impl(lambda x: 2 * x)
double_p.def_abstract_eval(lambda x: x)
jax.interpreters.ad.deflinear2(double_p, lambda t, x: [2 * t])
jax.interpreters.batching.defvectorized(double_p)
jax.interpreters.mlir.register_lowering(double_p, jax.interpreters.mlir.lower_fun(lambda x: 2 * x, False))
shifted_relu_p = jax.extend.core.Primitive("test_shifted_relu")
shifted_relu_p.def_impl(lambda x: jnp.maximum(x, 1.0))
shifted_relu_p.def_abstract_eval(lambda x: x)
jax.interpreters.batching.defvectorized(shifted_relu_p)
jax.interpreters.mlir.register_lowering(shifted_relu_p, jax.interpreters.mlir.lower_fun(lambda x: jnp.maximum(x, 1.0), False))


class ShiftedRelu(jaxlirpa.ElementwiseRule):
    _max = MaxWithConstant()

    def image(self, l, u):
        return self._max.image(l, u, 1.0)

    def relax(self, l, u):
        return self._max.relax(l, u, 1.0)


def test_user_registered_rules():
    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError):
        jaxlirpa.bound(lambda x: shifted_relu_p.bind(x @ W1), X, 0.1)
    jaxlirpa.register_rule(double_p, jaxlirpa.LINEAR)
    jaxlirpa.register_rule(shifted_relu_p, ShiftedRelu())
    try:
        fn = lambda x: double_p.bind(shifted_relu_p.bind(x @ W1))
        for method in ("ibp", "crown", "forward"):
            b = jaxlirpa.bound(fn, X, 0.1, method=method)
            pts = X + jax.random.uniform(KEY, (64, *X.shape), minval=-0.1, maxval=0.1)
            ys = jax.vmap(fn)(pts)
            assert np.all(b.lower <= ys.min(0) + 1e-5) and np.all(ys.max(0) <= b.upper + 1e-5)
    finally:  # the registry is global: leave it as the other tests expect it
        RULES.pop(double_p)
        RULES.pop(shifted_relu_p)


def test_sets_l1_l2_box_contain_samples():
    for s in (jaxlirpa.L2Ball(0.3), jaxlirpa.L1Ball(0.3), jaxlirpa.Box(X - 0.2, X + 0.1),
              jaxlirpa.LinfBall(jnp.full((1, 4), 0.1), lower=-1.4, upper=2.0)):
        b = jaxlirpa.bound(mlp, X, s, method="crown")
        lo, hi = s.region(X).interval()
        pts = lo + (hi - lo) * jax.random.uniform(KEY, (256, *X.shape))
        d = pts - X
        if isinstance(s, (jaxlirpa.L2Ball, jaxlirpa.L1Ball)):
            p = 2 if isinstance(s, jaxlirpa.L2Ball) else 1
            n = jnp.linalg.norm(d, ord=p, axis=-1, keepdims=True)
            pts = X + d * jnp.minimum(1.0, 0.3 / jnp.maximum(n, 1e-12))
        ys = jax.vmap(mlp)(pts)
        assert np.all(b.lower <= ys.min(0) + 1e-5) and np.all(ys.max(0) <= b.upper + 1e-5)


def test_lax_conv_nchw_and_exact_linear():
    W = jax.random.normal(KEY, (3, 2, 3, 3))
    fn = lambda x: lax.conv_general_dilated(x, W, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    x = jax.random.normal(KEY, (1, 2, 5, 5))
    b = jaxlirpa.bound(fn, x, 0.1, method="crown")
    i = jaxlirpa.bound(fn, x, 0.1, method="ibp")
    np.testing.assert_allclose(b.lower, i.lower, rtol=1e-5, atol=1e-5)
    y = fn(x)
    rad = lax.conv_general_dilated(jnp.full_like(x, 0.1), jnp.abs(W), (1, 1), "VALID",
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_allclose(b.lower, y - rad, rtol=1e-5, atol=1e-5)


def _products(jaxpr):
    """Every dot_general and convolution in ``jaxpr`` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _products(sub)


@pytest.mark.parametrize("method", METHODS)
def test_every_matrix_product_of_a_bound_runs_at_full_precision(method, monkeypatch):
    """A GPU's TF32 or a TPU's bfloat16 passes (their float32 default, which the model here
    asks for) would round bounds past reachable outputs: off a CPU (here pretended: the jaxpr
    is only traced), bounds ask for HIGHEST throughout."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    W = jax.random.normal(KEY, (3, 2, 3, 3))
    fn = lambda x: jax.nn.relu(lax.conv_general_dilated(  # noqa: E731
        x, W, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))).reshape(1, -1) @ jnp.ones((27, 2))
    x = jax.random.normal(KEY, (1, 2, 5, 5))
    found = list(_products(jax.make_jaxpr(lambda x: jaxlirpa.bound(fn, x, 0.1, method=method))(x).jaxpr))
    assert len(found) >= 2
    for eqn in found:
        assert eqn.params["precision"] == (lax.Precision.HIGHEST,) * 2, eqn


@jax.custom_vjp
def _custom_relu(x):
    return jnp.maximum(x, 0.0)


_custom_relu.defvjp(lambda x: (_custom_relu(x), x), lambda x, g: (g * (x > 0),))


@pytest.mark.parametrize("wrap", ["jit", "custom_vjp", "remat", "nested_jit"])
def test_calls_are_inlined(wrap):
    inner = {
        "jit": jax.jit(jax.nn.relu),
        "custom_vjp": _custom_relu,
        "remat": jax.checkpoint(jax.nn.relu),
        "nested_jit": jax.jit(lambda h: jax.jit(jax.nn.relu)(h) + 0.0),
    }[wrap]
    fn = lambda x: inner(x @ W1) @ W2
    for method in ("ibp", "crown"):
        np.testing.assert_allclose(jaxlirpa.bound(fn, X, 0.1, method=method).lower,
                                   jaxlirpa.bound(mlp, X, 0.1, method=method).lower, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_batch_size_chunks_give_the_same_bounds(method):
    x = jax.random.normal(KEY, (5, 4))
    C = jaxlirpa.margin_spec(jnp.arange(5) % 3, 3)
    opts = jaxlirpa.AlphaOptions(iterations=2) if method == "alpha-crown" else None
    full = jaxlirpa.bound(mlp, x, 0.1, method=method, spec=C, alpha=opts)
    chunked = jaxlirpa.bound(mlp, x, 0.1, method=method, spec=C, alpha=opts, batch_size=2)
    np.testing.assert_allclose(full.lower, chunked.lower, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        jaxlirpa.bound(mlp, x, 0.1, batch_size=0)


def test_verified_and_accuracy_agree_with_margins():
    y = jnp.argmax(mlp(X), axis=1)
    for method in ("ibp", "crown", "alpha-crown"):
        v = jaxlirpa.verified(mlp, X, y, 0.01, method=method)
        b = jaxlirpa.bound(mlp, X, 0.01, method="crown", spec=jaxlirpa.margin_spec(y, 3))
        assert v.dtype == jnp.bool_ and v.shape == (2,)
        if method != "ibp":
            assert np.all(np.asarray(v) >= np.asarray(jnp.all(b.lower > 0, axis=1)))
        assert float(jaxlirpa.verified_accuracy(mlp, X, y, 0.01, method=method)) == float(np.mean(v))
    wrong = (y + 1) % 3
    assert not np.any(jaxlirpa.verified(mlp, X, wrong, 0.01))


def test_functions_differing_only_in_inner_constants_never_share_compiled_bounds():
    # Weights closed over by a jitted inner function live in the jaxpr's parameters,
    # not in its text: the compilation caches must still tell the functions apart.
    f1 = jax.jit(lambda z, w=jnp.array([[1.0], [1.0]]): z @ w)
    f2 = jax.jit(lambda z, w=jnp.array([[5.0], [5.0]]): z @ w)
    x = jnp.zeros((1, 2))
    for method in ("ibp", "crown"):
        np.testing.assert_allclose(jaxlirpa.bound(f1, x, 0.1, method=method).upper, [[0.2]], rtol=1e-6)
        np.testing.assert_allclose(jaxlirpa.bound(f2, x, 0.1, method=method).upper, [[1.0]], rtol=1e-6)
    jaxlirpa.testing.assert_sound(f1, x, 0.1, method="ibp")
    with pytest.raises(AssertionError):
        jaxlirpa.testing.assert_sound(f2, x, 0.1, method="ibp", bounds=jaxlirpa.bound(f1, x, 0.1, method="ibp"))


def test_out_of_memory_says_to_pass_batch_size(monkeypatch):
    def exhausted(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 68719476736 bytes.")

    monkeypatch.setattr(jaxlirpa.api, "_compiled", lambda *a, **k: exhausted)
    with pytest.raises(MemoryError, match=r"pass batch_size=32"):
        jaxlirpa.bound(lambda x: jax.nn.relu(x), jnp.zeros((128, 3)), 0.1)


def layers(x):
    """Several outputs: a pre-activation, an activation and the logits (a pytree)."""
    h = x @ W1
    return {"pre": h, "post": (jax.nn.relu(h),), "out": mlp(x)}


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "forward", "alpha-crown"])
def test_pytree_of_outputs_is_bounded_leaf_by_leaf(method):
    """Every output leaf's bounds are sound (sampled and attacked points) and at least as
    tight as bounding that output alone, in one call that shares the intermediate bounds."""
    opts = jaxlirpa.AlphaOptions(iterations=3) if method == "alpha-crown" else None
    b = jax.jit(lambda x: jaxlirpa.bound(layers, x, 0.3, method=method, alpha=opts))(X)
    assert jax.tree_util.tree_structure(b.lower) == jax.tree_util.tree_structure(layers(X))
    for pick in (lambda t: t["pre"], lambda t: t["post"][0], lambda t: t["out"]):
        fn = lambda x: pick(layers(x))  # noqa: E731
        alone = jaxlirpa.bound(fn, X, 0.3, method=method, alpha=opts)
        lo, hi = pick(b.lower), pick(b.upper)
        assert np.all(lo >= alone.lower - 1e-5) and np.all(hi <= alone.upper + 1e-5)
        jaxlirpa.testing.assert_sound(fn, X, 0.3, method=method, bounds=jaxlirpa.Bounds(lo, hi), n_samples=256)


def test_pytree_of_outputs_refuses_a_spec():
    with pytest.raises(ValueError, match="single output"):
        jaxlirpa.bound(layers, X, 0.1, spec=jnp.ones((1, 3)))
