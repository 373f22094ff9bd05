"""alpha-CROWN: never looser than CROWN, sound, jittable, warm-startable, and at
least as tight as auto_LiRPA's alpha-CROWN on the oracle's cases that compile quickly."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlirpa
from jaxlirpa.attacks import pgd
from jaxlirpa.testing import assert_sound

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle  # noqa: E402

KEY = jax.random.key(0)
W1 = jax.random.normal(jax.random.key(1), (4, 24))
W2 = jax.random.normal(jax.random.key(2), (24, 24)) / 4
W3 = jax.random.normal(jax.random.key(3), (24, 3))
X = jax.random.normal(jax.random.key(4), (3, 4))
EPS = 0.3


def net(x):
    return jax.nn.leaky_relu(jax.nn.relu(x @ W1) @ W2, 0.1) @ W3


@pytest.fixture(scope="module")
def crown():
    return jaxlirpa.bound(net, X, EPS, method="crown")


@pytest.fixture(scope="module")
def alpha():
    return jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha=jaxlirpa.AlphaOptions(iterations=15))


def test_never_looser_than_crown_and_tighter_somewhere(crown, alpha):
    assert np.all(alpha.lower >= crown.lower - 1e-5) and np.all(alpha.upper <= crown.upper + 1e-5)
    assert np.sum(crown.upper - crown.lower) - np.sum(alpha.upper - alpha.lower) > 1e-3


def test_sound_against_samples_and_attacks(alpha):
    pts = X + jax.random.uniform(KEY, (2048, *X.shape), minval=-EPS, maxval=EPS)
    ys = jax.vmap(net)(pts)
    assert np.all(alpha.lower <= ys.min(0) + 1e-5) and np.all(ys.max(0) <= alpha.upper + 1e-5)
    for j in range(3):
        for sign in (1.0, -1.0):
            adv = pgd(lambda z: sign * net(z)[:, j], X, EPS, steps=30, restarts=2, key=KEY)
            y = net(adv)[:, j]
            assert np.all(alpha.lower[:, j] <= y + 1e-5) and np.all(y <= alpha.upper[:, j] + 1e-5)


def test_jit_and_custom_optimizer(crown, alpha):
    """Under an outer jit XLA fuses differently, and an optimisation path can drift by
    float noise: the jitted bound is held to alpha-CROWN's guarantees, not to equality."""
    opts = jaxlirpa.AlphaOptions(iterations=15)
    jitted = jax.jit(lambda x: jaxlirpa.bound(net, x, EPS, method="alpha-crown", alpha=opts))(X)
    assert np.all(jitted.lower >= crown.lower - 1e-5) and np.all(jitted.upper <= crown.upper + 1e-5)
    width = float(np.max(crown.upper - crown.lower))
    np.testing.assert_allclose(jitted.lower, alpha.lower, atol=0.05 * width)
    sgd = jaxlirpa.AlphaOptions(iterations=5, optimizer=optax.sgd(0.05), bound="lower")
    b = jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha=sgd)
    assert b.upper is None and np.all(np.isfinite(b.lower))


def test_warm_start_and_progress(crown):
    calls = []
    opts = jaxlirpa.AlphaOptions(iterations=3, progress=lambda i, loss: calls.append(int(i)))
    first = jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha=opts)
    jax.effects_barrier()
    assert calls, "progress callback never called"
    again = jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha=jaxlirpa.AlphaOptions(iterations=3),
                           alpha_init=first.alphas)
    assert np.all(again.lower >= crown.lower - 1e-5)
    assert np.sum(again.lower) >= np.sum(first.lower) - 1e-4


def test_pytree_outputs_warm_start():
    """A pytree of outputs gets one list entry of slopes per output; passed back, they warm
    start each output's runs, still sound and never looser than CROWN."""
    two = lambda x: {"logits": net(x), "hidden": jax.nn.relu(x @ W1)[:, :5]}  # noqa: E731
    crown = jaxlirpa.bound(two, X, EPS, method="crown")
    opts = jaxlirpa.AlphaOptions(iterations=4)
    first = jaxlirpa.bound(two, X, EPS, method="alpha-crown", alpha=opts)
    assert isinstance(first.alphas, list) and len(first.alphas) == 2
    again = jaxlirpa.bound(two, X, EPS, method="alpha-crown", alpha=opts, alpha_init=first.alphas)
    ys = jax.vmap(two)(X + jax.random.uniform(KEY, (512, *X.shape), minval=-EPS, maxval=EPS))
    for k in ("logits", "hidden"):
        assert np.all(again.lower[k] >= crown.lower[k] - 1e-5) and np.all(again.upper[k] <= crown.upper[k] + 1e-5)
        assert np.sum(again.lower[k]) >= np.sum(first.lower[k]) - 1e-4
        assert np.all(again.lower[k] <= ys[k].min(0) + 1e-5) and np.all(ys[k].max(0) <= again.upper[k] + 1e-5)
    with pytest.raises(TypeError, match="list of alphas"):
        jaxlirpa.bound(two, X, EPS, method="alpha-crown", alpha_init=first.alphas[0])


def test_upper_run_is_the_lower_run_of_the_negated_spec(alpha):
    """Both bounds come from one lower run mapped over ``(A, -A)``: the upper run alone
    gives the same upper bound; a warm start needs both runs' slopes."""
    opts = jaxlirpa.AlphaOptions(iterations=15, bound="upper")
    upper = jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha=opts)
    width = float(np.max(alpha.upper - alpha.lower))
    np.testing.assert_allclose(upper.upper, alpha.upper, atol=1e-5 * width)
    with pytest.raises(ValueError, match="both runs"):
        jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha_init={"lower": alpha.alphas["lower"], "upper": None})


def test_meet_with_best_is_differentiated_as_the_fresh_bound():
    """The intermediate bound met with the best so far has the fresh bound's gradient,
    exactly 1, whether the fresh bound is tighter, looser or tied (a tie once gave 1.5 and
    a tighter bound 2: the optimisation then hinged on float noise in the ties)."""
    from jaxlirpa.methods.alpha_crown import _meet_learning_fresh
    from jaxlirpa.rules.base import Interval

    best = Interval(jnp.array([0.0, 0.0, 0.0, -jnp.inf]), jnp.array([1.0, 1.0, 1.0, jnp.inf]))
    fresh = jnp.array([0.5, 0.0, -0.5, 0.2])
    value = lambda f: _meet_learning_fresh(Interval(f, f + 0.5), best)  # noqa: E731
    np.testing.assert_allclose(value(fresh).lower, [0.5, 0.0, 0.0, 0.2])
    grad = jax.grad(lambda f: jnp.sum(value(f).lower) + jnp.sum(value(f).upper))(fresh)
    np.testing.assert_array_equal(grad, [2.0, 2.0, 2.0, 2.0])


def test_alpha_options_validate():
    with pytest.raises(ValueError):
        jaxlirpa.AlphaOptions(bound="middle")
    with pytest.raises(ValueError, match="alpha-crown"):
        jaxlirpa.bound(net, X, EPS, method="crown", alpha=jaxlirpa.AlphaOptions())


def test_sparse_rows_change_no_bound_and_keep_alphas_full_sized():
    """Re-bounding only the unstable neurons, dropping the columns of inactive ones and
    multiplying those of active ones once for both sides (the default) follows the same optimisation as the dense passes (plain gradient steps: Adam
    would turn float noise in a zero gradient into full steps), and its alphas are full-sized:
    the dense run's slopes warm-start it."""
    from jaxlirpa.api import _compiled_first, _sparse_rows, trace_per_example

    eps = EPS / 2
    graph, consts, _ = trace_per_example(net, X)
    _, sizes = _sparse_rows(graph, "alpha-crown", None, _compiled_first(graph, None), consts,
                            jaxlirpa.LinfBall(eps).region(X))
    assert [(kind, k) for (kind, _, _), k in sizes] == [("columns", 20), ("rows", 10), ("shared", 8)]  # of 24
    sgd = optax.sgd(0.02)
    sparse_opts = jaxlirpa.AlphaOptions(iterations=8, optimizer=sgd)
    dense_opts = jaxlirpa.AlphaOptions(iterations=8, optimizer=sgd, sparse_intermediate=False)
    crown = jaxlirpa.bound(net, X, eps, method="crown")
    sparse = jaxlirpa.bound(net, X, eps, method="alpha-crown", alpha=sparse_opts)
    dense = jaxlirpa.bound(net, X, eps, method="alpha-crown", alpha=dense_opts)
    width = float(np.max(crown.upper - crown.lower))
    assert np.sum(crown.upper - crown.lower) - np.sum(sparse.upper - sparse.lower) > 1e-2
    np.testing.assert_allclose(sparse.lower, dense.lower, atol=1e-5 * width)
    np.testing.assert_allclose(sparse.upper, dense.upper, atol=1e-5 * width)
    shapes = lambda b: jax.tree_util.tree_map(jnp.shape, b.alphas)  # noqa: E731
    assert shapes(sparse) == shapes(dense)
    # the dense run's slopes warm-start the sparse program (which gathers the rows it keeps); the
    # other way needs no more than the equal shapes asserted above
    again = jaxlirpa.bound(net, X, eps, method="alpha-crown", alpha=sparse_opts, alpha_init=dense.alphas)
    assert np.all(again.lower >= crown.lower - 1e-5) and np.sum(again.lower) >= np.sum(dense.lower) - 1e-4


def bias_conv_net(x):
    """A dense layer with a bias (identity rows pass the ``add``) and a convolution
    (whose identity rows start as patches) before ReLUs."""
    h = jax.nn.relu(x @ W1 + 0.1) @ W2 + jnp.linspace(-1, 1, 24)
    c = jax.lax.conv_general_dilated(h.reshape(-1, 1, 4, 6), jnp.ones((2, 1, 2, 2)) / 4, (1, 1), "VALID")
    return jnp.concatenate([jax.nn.relu(h), jax.nn.relu(c).reshape(-1, 30)], -1)


def test_selected_rows_are_crown_rows_dense_and_as_patches():
    """An :class:`OnElements` start pulls back exactly those rows of the identity: through a
    bias ``add`` and a dense layer, and from a convolution's output as patches of the
    selected rows only (``patches.Frame.selected``)."""
    from jaxlirpa.api import trace_per_example
    from jaxlirpa.methods.alpha_crown import first_bounds, sparse_candidates, unstable
    from jaxlirpa.methods.context import Context
    from jaxlirpa.methods.crown import crown_intervals, interval_of, selected_interval

    graph, consts, _ = trace_per_example(bias_conv_net, X)
    region = jax.tree_util.tree_map(lambda a: a[0], jaxlirpa.LinfBall(EPS).region(X))
    context = lambda r: Context(graph, consts, [r.center], {graph.perturbed_inputs[0]: r})  # noqa: E731
    candidates = sparse_candidates(context(region))
    # dense, conv (NCHW in the model, traced channels-last: jaxlirpa/layout.py)
    assert [graph.avals[v].shape for v in candidates] == [(1, 24), (1, 3, 5, 2)]
    first, counts = jax.jit(lambda r: first_bounds(context(r)))(region)
    for v in candidates:
        mask = np.asarray(unstable(context(region), first, v))
        assert 0 < int(counts[("rows", v, mask.size)]) == mask.sum() < mask.size
        index = jnp.asarray(np.flatnonzero(mask))

        @jax.jit
        def full_and_selected(r):
            ctx = context(r)
            bounds = crown_intervals(ctx)
            full = interval_of(ctx, v, bounds)
            ref = jax.tree_util.tree_map(lambda a: a + 100.0, full)
            return full, ref, selected_interval(ctx, v, bounds, index, ref)

        full, ref, got = full_and_selected(region)
        for side in (0, 1):
            got_side, full_side, ref_side = (np.asarray(t[side]).reshape(-1) for t in (got, full, ref))
            np.testing.assert_allclose(got_side[mask], full_side[mask], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(got_side[~mask], ref_side[~mask])


def two_convs(x):
    """conv -> relu -> conv -> relu -> dense: conv2's rows reach relu1 as patches."""
    conv = lambda z, k: jax.lax.conv_general_dilated(z, jax.random.normal(jax.random.key(k), (2, z.shape[1], 3, 3)) / 3,
                                                     (1, 1), "VALID")  # noqa: E731
    h = jax.nn.relu(conv(jax.nn.relu(conv(x, 5)), 6))
    return h.reshape(h.shape[0], -1) @ jax.random.normal(jax.random.key(7), (32, 3))


def test_selected_patch_rows_keep_alphas_full_sized_for_warm_starts():
    """A convolution's selected rows (here conv2's, through relu1 as patches) return their
    slopes at full size, one per patch entry of every output neuron as every-neuron runs
    do, and the every-neuron run's slopes warm-start the selected-rows run, never looser
    than CROWN."""
    from jaxlirpa.api import _compiled_first, _sparse_rows, trace_per_example

    x, eps = jax.random.uniform(jax.random.key(8), (2, 1, 8, 8)), 0.05
    graph, consts, _ = trace_per_example(two_convs, x)
    _, sizes = _sparse_rows(graph, "alpha-crown", None, _compiled_first(graph, None), consts,
                            jaxlirpa.LinfBall(eps).region(x))
    assert [(kind, size, k) for (kind, _, size), k in sizes] == [("rows", 32, 24)]  # of conv2's 32 neurons
    sgd = optax.sgd(0.02)
    opts = {sparse: jaxlirpa.AlphaOptions(iterations=3, optimizer=sgd, sparse_intermediate=sparse)
            for sparse in (True, False)}
    crown = jaxlirpa.bound(two_convs, x, eps, method="crown")
    runs = {k: jaxlirpa.bound(two_convs, x, eps, method="alpha-crown", alpha=o) for k, o in opts.items()}
    shapes = lambda b: jax.tree_util.tree_map(jnp.shape, b.alphas)  # noqa: E731
    assert shapes(runs[True]) == shapes(runs[False])
    leaves = jax.tree_util.tree_leaves(shapes(runs[True]), is_leaf=lambda t: isinstance(t, tuple))
    assert (2, 2, 2, 4, 4, 2, 3, 3) in leaves  # (batch, sides, O, *Y, C, *K): per patch entry
    width = float(np.max(crown.upper - crown.lower))
    np.testing.assert_allclose(runs[True].lower, runs[False].lower, atol=1e-5 * width)
    assert_sound(two_convs, x, eps, method="alpha-crown", bounds=runs[True])
    # the every-neuron run's slopes warm-start the selected-rows program (the other way needs no
    # more than the equal shapes asserted above)
    again = jaxlirpa.bound(two_convs, x, eps, method="alpha-crown", alpha=opts[True], alpha_init=runs[False].alphas)
    assert np.all(again.lower >= crown.lower - 1e-5) and np.all(again.upper <= crown.upper + 1e-5)
    assert np.sum(again.lower) >= np.sum(runs[False].lower) - 1e-4


def test_kept_columns_and_their_gradient_are_plain_indexing():
    """Columns kept through a permutation (whose gradient gathers by the inverse) give the
    value and the VJP of plain column indexing."""
    from jaxlirpa.methods.crown import Columns, _take_columns

    A = jax.random.normal(KEY, (5, 12))
    dead = jnp.arange(12) % 3 == 0
    order = jnp.argsort(dead, stable=True)
    keep = Columns(order, jnp.argsort(order), 8)
    np.testing.assert_array_equal(keep.index, np.flatnonzero(~np.asarray(dead)))
    g = jax.random.normal(jax.random.key(9), (5, 8))
    ours = jax.vjp(lambda a: _take_columns(a, keep), A)
    plain = jax.vjp(lambda a: a[:, keep.index], A)
    np.testing.assert_array_equal(ours[0], plain[0])
    np.testing.assert_array_equal(ours[1](g)[0], plain[1](g)[0])


def test_row_count_rounds_up_with_little_spare():
    from jaxlirpa.methods.alpha_crown import row_count

    counts = np.arange(1, 3000)
    rows = np.array([row_count(int(c), 4096) for c in counts])
    assert row_count(0, 10) == 0 and row_count(50, 40) == 40
    assert np.all(rows >= counts) and np.all(rows <= 1.25 * counts) and len(set(rows)) < 60


# Smooth activations: tanh, exp, a convex power and a concave log have optimisable tangent
# points (sigmoid shares tanh's code: the oracle case covers it); the product's plane
# weights ride along.
V1 = jax.random.normal(jax.random.key(5), (4, 6)) / 2
V2 = jax.random.normal(jax.random.key(6), (18, 3)) / 2
VA, VB = (jax.random.normal(jax.random.key(k), (4, 3)) / 2 for k in (7, 8))


def smooth_net(x):
    h = x @ V1
    acts = [jnp.tanh(2 * h), jnp.exp(h / 2), jnp.log1p(h ** 2)]
    return jnp.concatenate(acts, -1) @ V2 + (x @ VA) * (x @ VB)


@pytest.fixture(scope="module")
def smooth():
    opts = jaxlirpa.AlphaOptions(iterations=10)
    crown = jaxlirpa.bound(smooth_net, X, EPS, method="crown")
    eager = jaxlirpa.bound(smooth_net, X, EPS, method="alpha-crown", alpha=opts)
    jitted = jax.jit(lambda x: jaxlirpa.bound(smooth_net, x, EPS, method="alpha-crown", alpha=opts))(X)
    return crown, eager, jitted


def test_smooth_activations_sound_and_tighter(smooth):
    """With and without an outer jit: never looser than CROWN, tighter overall, and sound
    against sampled and attacked points."""
    crown, *optimised = smooth
    for b in optimised:
        assert np.all(b.lower >= crown.lower - 1e-5) and np.all(b.upper <= crown.upper + 1e-5)
        assert np.sum(crown.upper - crown.lower) - np.sum(b.upper - b.lower) > 1e-2 * np.sum(crown.upper - crown.lower)
        assert_sound(smooth_net, X, EPS, n_samples=512, attack_steps=20, bounds=b)


def product_net(x):
    """Products only (``x * y``, ``x * x``, ``Q K^T`` of two tokens) between linear maps: the
    optimisable parameters are all the product's plane weights."""
    a, b = x @ VA, x @ VB
    q, k = (x @ V1).reshape(-1, 2, 3), (x @ V1[:, ::-1]).reshape(-1, 2, 3)
    scores = jnp.einsum("bqd,bkd->bqk", q, k).reshape(x.shape[0], -1)
    return jnp.concatenate([a * b, a * a, scores], -1) @ V2[:10]


def test_product_planes_tighten_soundly():
    """With only products to optimise: never looser than CROWN, tighter overall, and sound."""
    crown = jaxlirpa.bound(product_net, X, EPS, method="crown")
    b = jaxlirpa.bound(product_net, X, EPS, method="alpha-crown", alpha=jaxlirpa.AlphaOptions(iterations=10))
    assert np.all(b.lower >= crown.lower - 1e-5) and np.all(b.upper <= crown.upper + 1e-5)
    assert np.sum(crown.upper - crown.lower) - np.sum(b.upper - b.lower) > 1e-2 * np.sum(crown.upper - crown.lower)
    assert_sound(product_net, X, EPS, n_samples=512, attack_steps=20, bounds=b)


def test_fixed_intermediate_bounds():
    """``optimize_intermediate=False`` tunes the output's alphas only, still never looser than CROWN."""
    crown = jaxlirpa.bound(net, X, EPS, method="crown")
    opts = jaxlirpa.AlphaOptions(iterations=3, optimize_intermediate=False, bound="lower")
    b = jaxlirpa.bound(net, X, EPS, method="alpha-crown", alpha=opts)
    assert np.all(b.lower >= crown.lower - 1e-5) and np.sum(b.lower - crown.lower) > 1e-3


# (case, tolerance as a fraction of the width), L-inf sets; the MLPs' L2 sets, the CNNs and the
# ResNet block are as tight too (within 1e-3; measured, too slow to compile here).
ORACLE_CASES = [
    ("mlp_relu_2d", 1e-3),
    ("mlp_relu_10d", 1e-3),
    ("mlp_relu_784", 1e-3),
    ("mlp_spec_C", 1e-3),
    ("mlp_leaky_relu", 1e-3),
    ("mlp_tanh", 1e-3),
    ("mlp_sigmoid", 1e-3),
    ("mul_exp", 1e-3),
    ("attention", 1e-3),  # one weight per single product of both matmuls, as auto_LiRPA
]


@pytest.mark.skipif(not oracle.available(), reason="oracle data not found")
@pytest.mark.parametrize("name,tol", ORACLE_CASES)
def test_as_tight_as_auto_lirpa_alpha_crown(name, tol):
    """Same settings as the oracle (20 iterations, Adam, lr 0.1, decay 0.98): at least as
    tight as auto_LiRPA's alpha-CROWN up to ``tol`` of the width, never looser than CROWN
    (auto_LiRPA's, which ours equals: tests/test_oracle_tightness.py)."""
    case = oracle.load_case(name)
    S = case.sets["linf"]
    b = jaxlirpa.bound(case.fn, jnp.asarray(case.x0), jaxlirpa.LinfBall(S.eps), method="alpha-crown",
                       spec=case.C, alpha=jaxlirpa.AlphaOptions(learning_rate=0.1))
    rl, ru = S.methods["alpha-CROWN"]
    cl, cu = S.methods["CROWN_pure"]
    lo, hi = np.asarray(b.lower).reshape(rl.shape), np.asarray(b.upper).reshape(ru.shape)
    same = 1e-5 * np.max(cu - cl)
    assert np.all(lo >= cl - same) and np.all(hi <= cu + same)
    assert np.all(lo <= S.emp_min + 1e-5) and np.all(hi >= S.emp_max - 1e-5)
    atol = tol * np.max(ru - rl) + 1e-6
    assert np.max(rl - lo) <= atol and np.max(hi - ru) <= atol


def test_a_neuron_pinned_at_the_kink_keeps_its_column():
    """``min(x, 6)`` on a neuron whose bounds are exactly [6, 6] is both constant and the
    identity; its relaxation is the identity, so its column must be kept (it was once
    dropped as constant, and the bounds lost 6 x its weight, 30 here)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    W = jax.random.normal(k1, (4, 6)).at[:, 0].set(0.0)
    V = jax.random.normal(k2, (6, 3)).at[0].set(5.0)
    pinned = lambda x: jnp.minimum(x @ W + jnp.zeros(6).at[0].set(6.0), 6.0) @ V  # noqa: E731
    x = jax.random.normal(jax.random.key(3), (2, 4))
    b = jaxlirpa.bound(pinned, x, 0.3, method="alpha-crown", alpha=jaxlirpa.AlphaOptions(iterations=3))
    y = pinned(x)
    assert np.all(b.lower <= y + 1e-5) and np.all(b.upper >= y - 1e-5)
    assert_sound(pinned, x, 0.3, method="alpha-crown", bounds=b)


def test_a_program_with_covering_sizes_is_reused_with_the_same_bounds():
    """At eps 0.1 the net needs 16 kept columns and 6 rows; the program compiled at eps 0.12
    (20 columns, 7 rows, the same 8 shared) covers them: it is reused, not compiled again,
    and gives the bounds a program of the exact sizes gives."""
    from jaxlirpa import api

    graph, consts, _ = api.trace_per_example(net, X)
    sizes = lambda eps: [(kind, k) for (kind, _, _), k in api._sparse_rows(  # noqa: E731
        graph, "alpha-crown", None, api._compiled_first(graph, None), consts, jaxlirpa.LinfBall(eps).region(X))[1]]
    assert sizes(0.12) == [("columns", 20), ("rows", 7), ("shared", 8)]
    assert sizes(0.1) == [("columns", 16), ("rows", 6), ("shared", 8)]
    opts = jaxlirpa.AlphaOptions(iterations=4, optimizer=optax.sgd(0.02))
    api._CACHE.clear()
    try:
        jaxlirpa.bound(net, X, 0.12, method="alpha-crown", alpha=opts)
        programs = len(api._CACHE)
        reused = jaxlirpa.bound(net, X, 0.1, method="alpha-crown", alpha=opts)
        assert len(api._CACHE) == programs
        api._CACHE.clear()
        exact = jaxlirpa.bound(net, X, 0.1, method="alpha-crown", alpha=opts)
    finally:
        api._CACHE.clear()
    width = float(np.max(exact.upper - exact.lower))
    np.testing.assert_allclose(reused.lower, exact.lower, atol=1e-5 * width)
    np.testing.assert_allclose(reused.upper, exact.upper, atol=1e-5 * width)
