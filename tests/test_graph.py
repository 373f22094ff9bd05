"""Tracing rewrites and control flow (``jaxlirpa/graph.py``): ``div``/``max``/``min``
of two perturbed operands, ``cond``/``switch`` with an index known while tracing or
only at run time, ``while_loop`` unrolling, and the errors for what cannot be
bounded. Each rewritten graph must evaluate to the function's own value, and its
bounds must contain sampled and attacked points."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlirpa
from jaxlirpa import graph as graph_lib
from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.testing import assert_sound

CHECK = dict(n_samples=64, attack_steps=5)
W = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)) / 2, jnp.float32)
ALPHA = jaxlirpa.AlphaOptions(iterations=3)


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    """Compiling dominates: spare XLA's LLVM optimisations (as tests/test_soundness.py does)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def x():
    return jax.random.uniform(jax.random.key(1), (2, 4), jnp.float32)


def _bound(fn, x, method):
    return jaxlirpa.bound(fn, x, 0.1, method=method, alpha=ALPHA if method == "alpha-crown" else None)


def _graph(fn, shape=(4,)):
    graph, consts = graph_lib.trace(fn, [jax.ShapeDtypeStruct(shape, jnp.float32)], [True])
    return graph, consts


def _perturbed_prims(graph):
    return [e.prim for e in graph.eqns if any(graph.is_perturbed(v) for v in e.inputs)]


def _assert_evaluates_to(fn, x0):
    graph, consts = _graph(fn, x0.shape)
    np.testing.assert_allclose(graph.evaluate(consts, [x0])[0], fn(x0), rtol=1e-6, atol=1e-6)
    return graph


# ---------------------------------------------------------------- two perturbed operands


C = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def two_perturbed(x):
    """``a / b``, ``max``, ``min`` with implicit size-1 broadcasting (``f32[2,4] op f32[2,1]``),
    also of one perturbed operand by a constant, and ``reduce_max``."""
    h = (x - 0.5) @ W
    a, b = h.reshape(-1, 2, 4), (2.0 + jnp.tanh(h)).reshape(-1, 2, 4)[:, :, :1]
    parts = [a / b, jnp.maximum(a, b), jnp.minimum(b, a), jnp.maximum(b, C), C / b, jnp.max(a, axis=-1)]
    return jnp.concatenate([p.reshape(x.shape[0], -1) for p in parts], axis=-1)


def test_two_perturbed_rewritten(x):
    graph = _assert_evaluates_to(lambda xi: two_perturbed(xi[None])[0], x[0])
    for e in graph.eqns:  # no div, max or min of two perturbed operands, nor a perturbed one broadcast, is left
        if e.prim in (P.div_p, P.max_p, P.min_p):
            perturbed = [graph.is_perturbed(v) for v in e.inputs]
            assert not all(perturbed), e.prim
            assert all(a.shape == e.out_avals[0].shape for a, p in zip(e.in_avals, perturbed) if p), e.prim
    prims = _perturbed_prims(graph)
    assert P.mul_p in prims and P.max_p in prims and P.reduce_max_p in prims


def test_max_of_itself_is_exact(x):
    """``max(h, h)`` and ``max(h, -inf)`` (softmax's lowering) are ``h``: bounded like ``h``
    itself, not through ``relu(h - h)`` or a relaxation at the kink ``-inf``."""
    fn = lambda x: (x - 0.5) @ W
    itself = lambda x: (lambda h: jnp.maximum(h, h) + jnp.minimum(h, h) + jnp.maximum(h, -jnp.inf))(fn(x))
    graph = _assert_evaluates_to(lambda xi: itself(xi[None])[0], x[0])
    assert P.copy_p in _perturbed_prims(graph)
    assert not {P.max_p, P.min_p} & set(_perturbed_prims(graph))
    b, ref = _bound(itself, x, "crown"), _bound(fn, x, "crown")
    np.testing.assert_allclose(b.lower, 3 * ref.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.upper, 3 * ref.upper, rtol=1e-5, atol=1e-5)


def test_div_by_interval_holding_zero_is_not_finite(x):
    """The reciprocal's domain: a denominator that may be 0 gives no finite bound (never a wrong one)."""
    b = _bound(lambda x: x / (x - 0.5), x, "crown")
    assert np.any(np.abs(x - 0.5) < 0.1)
    assert not np.any(np.isfinite(b.lower) & np.isfinite(b.upper) & (np.abs(x - 0.5) < 0.1))


# ---------------------------------------------------------------- cond / switch

FLAG = jnp.int32(1)


def branches(x, flag=FLAG):
    """``cond`` whose untaken branch (flag 1) takes the ``log`` of possibly negative
    values, and a three-way ``switch``."""
    h = (x - 0.5) @ W
    a = lax.cond(flag > 0, lambda h: 2.0 * jax.nn.relu(h), lambda h: jax.nn.relu(jnp.log(h)) + jnp.tanh(h), h)
    return a + lax.switch(flag, [jnp.sin, jnp.tanh, lambda h: h * h], h)


def test_cond_known_index_takes_one_branch(x):
    graph = _assert_evaluates_to(lambda xi: branches(xi[None])[0], x[0])
    prims = _perturbed_prims(graph)
    assert P.tanh_p in prims and not {P.log_p, P.sin_p, P.select_n_p} & set(prims)
    literal = _assert_evaluates_to(lambda xi: lax.cond(True, jnp.sin, jnp.cos, xi), x[0])
    assert [e.prim for e in literal.eqns] == [P.sin_p]


def test_cond_decision_is_part_of_the_signature():
    """A branch chosen by a constant's value: graphs of equal jaxpr text must not share compiled code."""
    one, _ = _graph(lambda xi: branches(xi[None], jnp.int32(1))[0])
    two, _ = _graph(lambda xi: branches(xi[None], jnp.int32(2))[0])
    assert one.signature != two.signature


@pytest.mark.parametrize("method", ["ibp", "crown", "forward"])
def test_cond_run_time_index_sound(method, x):
    """With the index a tracer of an outer jit, every branch is bounded and the taken
    one selected: the bounds equal those with the index known while tracing, and the
    untaken ``log`` of negative values does not spoil them."""
    b = jax.jit(lambda flag, x: _bound(lambda z: branches(z, flag), x, method))(FLAG, x)
    ref = _bound(branches, x, method)
    np.testing.assert_allclose(b.lower, ref.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.upper, ref.upper, rtol=1e-5, atol=1e-5)
    assert_sound(branches, x, 0.1, method=method, bounds=b, **CHECK)


def test_cond_run_time_index_gradient(x):
    """Gradients through the bounds stay finite (the untaken ``log``) and equal those with a known index."""
    lower = lambda fn: (lambda x: _bound(fn, x, "ibp").lower.sum())
    g = jax.jit(lambda flag, x: jax.grad(lower(lambda z: branches(z, flag)))(x))(FLAG, x)
    np.testing.assert_allclose(g, jax.grad(lower(branches))(x), rtol=1e-5, atol=1e-6)


def test_cond_run_time_index_graph(x):
    graph, consts = graph_lib.trace(lambda flag, xi: branches(xi[None], flag)[0],
                                    [jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.float32)],
                                    [False, True])
    assert {P.log_p, P.sin_p, P.select_n_p} <= set(_perturbed_prims(graph))
    for flag in range(3):
        np.testing.assert_allclose(graph.evaluate(consts, [jnp.int32(flag), x[0]])[0], branches(x[:1], flag)[0],
                                   rtol=1e-6)


def test_cond_on_perturbed_index_raises(x):
    fn = lambda x: lax.cond(jnp.sum(x) > 1.0, jnp.sin, jnp.cos, x)
    line = fn.__code__.co_firstlineno
    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError,
                       match=rf"primitive 'cond' .* at .*test_graph.py:{line} .*depends on the perturbed input"):
        jaxlirpa.bound(fn, x, 0.1)


# ---------------------------------------------------------------- loops


def loops(x):
    """``fori_loop`` with ``jnp.int32`` bounds (a ``while``: reverse-mode AD refuses it,
    hence the ``stop_gradient``; the bounds ignore it) and with Python ints (a ``scan``)."""
    body = lambda i, h: jnp.tanh(h @ W[:, :4] + 0.1 * i)
    return (lax.fori_loop(jnp.int32(0), jnp.int32(3), body, lax.stop_gradient(x - 0.5))
            + lax.fori_loop(0, 2, body, x - 0.5))


def test_while_unrolled(x):
    graph = _assert_evaluates_to(lambda xi: loops(xi[None])[0], x[0])
    assert _perturbed_prims(graph).count(P.tanh_p) == 5
    assert "while: 3 steps" in graph.signature


@pytest.mark.parametrize("fn, message", [
    (lambda x: lax.while_loop(lambda c: jnp.sum(c) < 10.0, lambda c: 2.0 * c, x),
     "condition depends on the perturbed input"),
    (lambda x: lax.fori_loop(jnp.int32(0), jnp.int32(6), lambda i, c: 2.0 * c, x), "runs more than 5 steps"),
])
def test_while_refused(fn, message, x, monkeypatch):
    monkeypatch.setattr(graph_lib, "MAX_UNROLLED_STEPS", 5)
    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError, match=rf"primitive 'while' .*test_graph.py.*{message}"):
        jaxlirpa.bound(fn, x, 0.1)


def test_while_unknown_trip_count_raises(x):
    run = jax.jit(lambda n, x: jaxlirpa.bound(lambda z: lax.fori_loop(0, n, lambda i, c: 2.0 * c, z), x, 0.1).lower)
    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError, match=re.escape("lax.scan, or fori_loop with Python int")):
        run(3, x)


# ---------------------------------------------------------------- alpha-CROWN


def test_alpha_crown(x):
    """alpha-CROWN through the rewrites (implicit broadcasting) and a run-time ``cond``
    whose untaken branch takes the ``log`` of negatives."""
    def fn(flag, z):
        h = (z - 0.5) @ W[:, :4]
        a, b = h.reshape(-1, 2, 2), (2.0 + jnp.tanh(h)).reshape(-1, 2, 2)[:, :, :1]
        c = lax.cond(flag > 0, jax.nn.relu, lambda t: jax.nn.relu(jnp.log(t)), h)
        return jnp.concatenate([(a / b).reshape(-1, 4), jnp.maximum(a, b).reshape(-1, 4), c], axis=-1)

    b = jax.jit(lambda flag, x: _bound(lambda z: fn(flag, z), x, "alpha-crown"))(FLAG, x)
    assert np.all(np.isfinite(b.lower)) and np.all(np.isfinite(b.upper))
    assert_sound(lambda z: fn(FLAG, z), x, 0.1, method="alpha-crown", bounds=b, **CHECK)
