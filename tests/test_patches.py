"""The patches form of CROWN's conv coefficients (methods/patches.py) gives the dense form's bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxlirpa
from jaxlirpa import api
from jaxlirpa.methods import patches
from jaxlirpa.rules.base import Interval
from jaxlirpa.graph import trace
from jaxlirpa.methods.context import Context
from jaxlirpa.testing import assert_sound


def _conv(x, w, layout, stride=1, padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    spec = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
    return lax.conv_general_dilated(x, w, (stride, stride), padding, rhs_dilation=dilation,
                                    dimension_numbers=spec, feature_group_count=groups)


def _kernel(key, layout, out_c, in_c, k):
    w = jax.random.normal(jax.random.key(key), (out_c, in_c, k, k)) / np.sqrt(in_c * k * k)
    return jnp.transpose(w, (2, 3, 1, 0)) if layout == "NHWC" else w


def _net(layout):
    """pad -> conv (stride 2) -> relu -> conv (dilation 2, groups 2, asymmetric padding) -> relu
    -> conv (stride 2) -> tanh -> dense; every conv's identity rows go through the patches path."""
    w1, w2, w3 = _kernel(1, layout, 4, 2, 3), _kernel(2, layout, 4, 2, 2), _kernel(3, layout, 3, 4, 3)
    wd = jax.random.normal(jax.random.key(4), (48, 3)) / 7
    spatial = (1, 2) if layout == "NHWC" else (2, 3)

    def fn(x):
        x = jnp.pad(x, [(0, 0)] + [(1, 2) if a in spatial else (0, 0) for a in range(1, 4)])
        x = jax.nn.relu(_conv(x, w1, layout, stride=2, padding=((1, 1), (0, 1))) - 0.1)
        x = jax.nn.relu(_conv(x, w2, layout, padding=((2, 1), (1, 2)), dilation=(2, 2), groups=2))
        x = jnp.tanh(_conv(x, w3, layout, stride=2, padding=((1, 1), (1, 1))) * 1.5)
        return x.reshape(x.shape[0], -1) @ wd

    shape = (2, 9, 9, 2) if layout == "NHWC" else (2, 2, 9, 9)
    return fn, jax.random.uniform(jax.random.key(5), shape)


def _pooled(layout):
    """conv -> relu -> max pool -> conv -> relu: patches meet a rule without a patches form."""
    w1, w2 = _kernel(6, layout, 3, 1, 3), _kernel(7, layout, 2, 3, 2)
    window = (1, 2, 2, 1) if layout == "NHWC" else (1, 1, 2, 2)

    def fn(x):
        x = jax.nn.relu(_conv(x, w1, layout, padding=((1, 1), (1, 1))))
        x = lax.reduce_window(x, -jnp.inf, lax.max, window, window, "VALID")
        return jax.nn.relu(_conv(x, w2, layout)).reshape(x.shape[0], -1)

    return fn, jax.random.uniform(jax.random.key(8), (1, 6, 6, 1) if layout == "NHWC" else (1, 1, 6, 6))


_START = patches.start


@pytest.fixture
def dense_only(monkeypatch):
    """CROWN without the patches form: identity rows of convolutions start dense."""
    monkeypatch.setattr(patches, "start", lambda *args: None)
    api._CACHE.clear()
    yield
    api._CACHE.clear()


def _bounds(fn, x, method, eps):
    """alpha-CROWN by plain gradient steps: Adam's first step moves every slope by the full
    rate whatever its gradient's size, float noise in a zero gradient included. Its lower
    run alone: the intermediate bounds in it use both sides' slopes."""
    if method != "alpha-crown":
        b = jaxlirpa.bound(fn, x, eps, method=method)
        return np.asarray(b.lower), np.asarray(b.upper)
    alpha = jaxlirpa.AlphaOptions(iterations=3, optimizer=optax.sgd(0.5), bound="lower")
    lower = np.asarray(jaxlirpa.bound(fn, x, eps, method=method, alpha=alpha).lower)
    return lower, lower


# crown-ibp has no identity starts (IBP intermediates), so no patches; ibp uses them on an L2 ball;
# alpha-crown on _net tunes a ReLU's slopes per patch entry (dense: per row and neuron).
CASES = [(_net, "NHWC", "crown", 0.1), (_net, "NCHW", "crown", jaxlirpa.L1Ball(0.5)),
         (_net, "NHWC", "ibp", jaxlirpa.L2Ball(0.5)), (_pooled, "NCHW", "crown", 0.2),
         (_net, "NCHW", "alpha-crown", 0.1)]


@pytest.fixture(scope="module")
def fast_bounds():
    """``case -> (bounds with the patches form, how many passes started it)``, memoised."""
    found = {}

    def compute(case):
        if case not in found:
            build, layout, method, eps = case
            starts, current = [], patches.start
            patches.start = lambda *args: starts.append(_START(*args)) or starts[-1]
            api._CACHE.clear()
            try:
                fn, x = build(layout)
                found[case] = _bounds(fn, x, method, eps), sum(s is not None for s in starts)
            finally:
                patches.start = current
                api._CACHE.clear()
        return found[case]

    return compute


@pytest.mark.parametrize("build,layout,method,eps", [
    pytest.param(*case, id=f"{case[0].__name__[1:]}-{case[1]}-{case[2]}-{type(case[3]).__name__}",
                 marks=[pytest.mark.slow] if case[2] == "alpha-crown" else [])
    for case in CASES])
def test_patches_equal_dense(fast_bounds, dense_only, build, layout, method, eps):
    """Every method that starts patches gives the dense path's bounds (both are sound:
    the dense path is checked by tests/test_soundness.py). alpha-CROWN to 1e-3: its first
    step already moves the two paths' bounds apart by ~1e-4 (the paths sum in other orders,
    and the optimisation amplifies the last bits; seen with XLA's classic CPU emitter)."""
    (lo, hi), started = fast_bounds((build, layout, method, eps))
    assert started > 0  # the fast path ran
    fn, x = build(layout)
    dlo, dhi = _bounds(fn, x, method, eps)
    assert np.all(np.isfinite(lo)) and np.all(lo <= hi)
    tol = (1e-3 if method == "alpha-crown" else 1e-5) * np.maximum(1.0, np.abs(dhi - dlo))
    np.testing.assert_array_less(np.abs(lo - dlo), tol)
    np.testing.assert_array_less(np.abs(hi - dhi), tol)


def _interval_of_last(fn, l, u):
    """The rule's interval of ``fn``'s last equation, its perturbed operand in ``[l, u]``."""
    graph, consts = trace(fn, [jax.ShapeDtypeStruct(l.shape, l.dtype)], [True])
    ctx = Context(graph, consts, [l], {})
    eqn = graph.eqns[-1]
    return ctx.rule(eqn).interval(eqn, ctx.operands(eqn, {graph.inputs[0]: Interval(l, u)}))


def test_linear_interval_with_infinite_bounds_has_no_nan():
    """``(l + u) / 2`` of an unbounded input is NaN; the outputs it reaches become
    unbounded instead, and the others keep their exact interval."""
    l, u = jnp.array([-jnp.inf, 1.0, -5.0]), jnp.array([2.0, 3.0, jnp.inf])
    W = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    lo, hi = _interval_of_last(lambda x: x @ W, l, u)
    np.testing.assert_array_equal(lo, [-np.inf, 0.0])  # column 0 reads the unbounded input 0; column 1 reads none
    np.testing.assert_array_equal(hi, [np.inf, 0.0])
    lo, hi = _interval_of_last(lambda x: x + 1.0, l, u)
    np.testing.assert_array_equal(lo, [-np.inf, 2.0, -np.inf])
    np.testing.assert_array_equal(hi, [np.inf, 4.0, np.inf])


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_selected_rows_are_those_rows_of_the_full_patches(layout):
    """Patches of selected rows (alpha-CROWN's unstable neurons) hold exactly those rows of
    the full patches: densified, dotted with a point, and concretised over a box."""
    fn, x = _net(layout)
    graph, consts = trace(lambda z: fn(z[None])[0], [jax.ShapeDtypeStruct(x.shape[1:], x.dtype)], [True])
    conv = next(e for e in graph.eqns if e.prim is lax.conv_general_dilated_p)
    shape, n = conv.in_avals[0].shape, int(np.prod(conv.out_avals[0].shape))
    chosen = jnp.asarray([n - 1, 0, 7, 3, 7])

    @jax.jit  # one program, where eager evaluation compiles every operation on its own
    def selected_and_full(x0, point):
        ctx = Context(graph, consts, [x0], {})
        ops = ctx.operands(conv, {graph.inputs[0]: Interval(x0, x0)})
        full, some = (patches.start(ctx, conv, ops, *rows)[0][0][0] for rows in ((), (chosen,)))
        box = jax.tree_util.tree_map(lambda a: a[0], jaxlirpa.Box(point - 0.3, point + 0.2).region(point[None]))
        return [(some.dense(shape), full.dense(shape)[chosen]), (some.dot(point), full.dot(point)[chosen])] + [
            (some.concretize(box, sign), full.concretize(box, sign)[chosen]) for sign in (-1, 1)]

    (dense_some, dense_full), *others = selected_and_full(x[0], jax.random.normal(jax.random.key(9), shape))
    np.testing.assert_allclose(dense_some, dense_full, atol=1e-6)
    for ours, theirs in others:  # dotted with a point; concretised over a box, both signs
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture
def window_diffs(monkeypatch):
    """``use(share)``: from then on every ReLU between convolutions keeps its upper side as
    a ``WindowDiff`` of ``1 / share`` of each window (1: every entry fits; large: no
    position fits, and the convolution composes the upper side in full). Returns the list
    of the compositions that used one and that of the choices they made when run."""
    calls, fits = [], []

    def compose(eqn, W, lower, diff, *rest):
        calls.append(diff)
        jax.debug.callback(lambda f: fits.append(bool(f)), diff.fits)
        return compose_sides(eqn, W, lower, diff, *rest)

    compose_sides = patches._compose_sides
    monkeypatch.setattr(patches, "_compose_sides", compose)

    def use(share):
        monkeypatch.setattr(patches, "_DIFF_MIN_ENTRIES", 0)
        monkeypatch.setattr(patches, "_DIFF_SHARE", share)
        api._CACHE.clear()
        return calls, fits

    yield use
    api._CACHE.clear()


@pytest.mark.parametrize("layout,share", [("NHWC", 1), ("NHWC", 100), ("NCHW", 1)])
def test_window_diffs_give_the_bounds_of_two_compositions(window_diffs, layout, share):
    """The upper side composed as the lower one plus its difference at the few window
    entries where they differ (or in full when those do not fit) gives the bounds of two
    full compositions, for a batch at once and in chunks with a remainder (the choice is
    made for all examples together), and their gradient under jit; the bounds are sound."""
    fn, x = _net(layout)
    x = jnp.concatenate([x, 0.9 * x, 0.5 * x])

    def width_and_grad():  # a new jit each time: the settings are read while tracing
        def width(s):
            b = jaxlirpa.bound(lambda z: fn(z * s), x, 0.1, method="crown")
            return jnp.sum(b.upper - b.lower)
        return jax.jit(jax.value_and_grad(width))(1.0)

    want = jaxlirpa.bound(fn, x, 0.1, method="crown"), width_and_grad()
    calls, fits = window_diffs(share)
    for batch_size in (None, 4):  # 6 examples: all at once; a chunk of 4 and the remaining 2
        got = jaxlirpa.bound(fn, x, 0.1, method="crown", batch_size=batch_size)
        np.testing.assert_allclose(got.lower, want[0].lower, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.upper, want[0].upper, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(width_and_grad(), want[1], rtol=1e-5)
    assert len(calls) == 4  # batched, chunked (the chunks, the rest), under jit with its gradient
    assert set(fits) == {share == 1}  # one choice per program run, for all its examples
    assert_sound(fn, x, 0.1, method="crown", bounds=got, n_samples=64, attack_steps=10)


def test_window_diffs_in_alpha_crowns_first_pass(window_diffs):
    """alpha-CROWN's first CROWN pass (its intermediate bounds before optimising, and the
    counts that size its sparse passes) keeps WindowDiffs too: the same bounds as without
    them (1e-3, see test_patches_equal_dense), and sound."""
    fn, x = _net("NHWC")
    want, _ = _bounds(fn, x, "alpha-crown", 0.1)
    calls, fits = window_diffs(1)
    got, _ = _bounds(fn, x, "alpha-crown", 0.1)
    assert calls and set(fits) == {True}
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    lower_only = jaxlirpa.Bounds(jnp.asarray(got), jnp.full_like(got, jnp.inf))
    assert_sound(fn, x, 0.1, method="alpha-crown", bounds=lower_only, n_samples=64, attack_steps=10)
