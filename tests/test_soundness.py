"""Registry-driven soundness suite: every rule in ``jaxlirpa.rules.base.RULES`` is
exercised by a tiny function, under every method, with and without ``jax.jit``,
over several sets, and checked by ``jaxlirpa.testing.assert_sound`` (sampled
points plus gradient attacks must stay inside the bounds).

``CASES`` maps each registered primitive to the functions that exercise it; a new
rule without a case fails ``test_every_rule_has_a_case``. A case is one tiny
function of a batched input, usually several variants of its primitive side by
side (flattened and concatenated): compiling dominates the run time, and XLA's
cost per program matters more than its size. Every function starts with a random
dense or conv layer on ``x - 0.5`` (x uniform in [0, 1]), so with ``EPS`` many
intervals straddle the kinks and many do not.

Known library bugs are listed in ``KNOWN`` and run as ``xfail(strict=True)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlirpa
from jaxlirpa._compat import lax_primitives as P
from jaxlirpa.graph import leaky_relu_p, trace
from jaxlirpa.rules.base import RULES
from jaxlirpa.sets import Region
from jaxlirpa.testing import assert_sound, sample_points

METHODS = ["ibp", "crown", "crown-ibp", "forward"]
EPS = 0.15
CHECK = dict(n_samples=128, attack_steps=10, max_coords=32)
SHAPES = {"vec": (2, 6), "img": (2, 5, 5, 2)}  # img is NHWC (flax); NCHW branches transpose it

_rng = np.random.default_rng(0)


def _w(*shape, fan_in=None):
    fan_in = fan_in or shape[0]
    return jnp.asarray(_rng.normal(size=shape) * 2.0 / np.sqrt(fan_in), jnp.float32)


W1, W2 = _w(6, 6), _w(6, 6)
B1 = _w(6, fan_in=16)
C6 = jnp.asarray([-0.3, 0.2, 0.0, 0.5, -0.1, 0.25], jnp.float32)
C6_POS = jnp.asarray([0.5, 2.0, 1.5, 3.0, 0.7, 1.2], jnp.float32)
K_HWIO = _w(3, 3, 2, 3, fan_in=18)  # NHWC / HWIO (flax)
K_OIHW = _w(4, 1, 2, 2, fan_in=4)  # NCHW / OIHW (torch), feature_group_count=2
IDX = np.array([4, 0, 0, 3, 5])


def dense(x, W=W1):
    return (x - 0.5) @ W + B1


def conv_nhwc(x):
    return lax.conv_general_dilated(x - 0.5, K_HWIO, window_strides=(2, 1), padding="SAME",
                                    rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_nchw(x):
    x = jnp.transpose(x - 0.5, (0, 3, 1, 2))  # torch layout
    return lax.conv_general_dilated(x, K_OIHW, window_strides=(1, 2), padding=((1, 0), (2, 1)),
                                    rhs_dilation=(2, 1), dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                    feature_group_count=2)


def _cat(*outs):
    return jnp.concatenate([o.reshape(o.shape[0], -1) for o in outs], axis=-1)


def _bn_variables():
    bn = nn.BatchNorm(use_running_average=True)
    v = bn.init(jax.random.key(0), jnp.zeros((1, 6)))
    v = {"params": {"scale": jnp.asarray([1.5, -0.7, 0.3, 2.0, 1.0, -1.2]), "bias": C6},
         "batch_stats": {"mean": jnp.asarray([0.2, -0.1, 0.0, 0.3, -0.4, 0.1]),
                         "var": jnp.asarray([0.5, 2.0, 0.1, 1.0, 0.3, 4.0])}}
    return bn, v


_BN, _BN_VARS = _bn_variables()


def _add_any(x):
    h = dense(x)
    # The transpose of a fan-out ``t -> 2t + 3t`` sums its cotangents with add_any.
    return jax.linear_transpose(lambda t: t * 2.0 + t * 3.0, h)(h)[0]


def _leaky(x):
    h = dense(x)
    return _cat(jax.nn.leaky_relu(h, 0.01), jax.nn.leaky_relu(h, 0.3), jax.nn.leaky_relu(h, 2.0),
                jnp.where(h > 0, h, 0.2 * h))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    shape: str = "vec"

    def __repr__(self):
        return self.name


MLP = Case("mlp", lambda x: dense(jax.nn.relu(dense(x)), W2))
CONV = Case("conv", lambda x: _cat(jax.nn.relu(conv_nhwc(x)), jax.nn.relu(conv_nchw(x))), "img")
ARITH = Case("arith", lambda x: _cat(
    dense(x) + C6, dense(x) + dense(x, W2), C6 - dense(x), dense(x) - dense(x, W2), -dense(x),
    dense(x) * 2.5, dense(x) * C6, dense(x) / 3.0, dense(x) / C6_POS))
STRUCTURAL = Case("structural", lambda x: _cat(
    dense(x).reshape(-1, 2, 3).transpose(0, 2, 1),
    jnp.squeeze(dense(x).reshape(-1, 1, 6), 1),
    jnp.broadcast_to(jnp.expand_dims(dense(x), 1), (x.shape[0], 2, 6)),
    jnp.flip(dense(x).reshape(-1, 2, 3), (1, 2))))
CONCAT = Case("concat", lambda x: _cat(
    jnp.concatenate([dense(x), jnp.broadcast_to(C6, (x.shape[0], 6))], axis=1),
    jnp.concatenate([dense(x), -dense(x), dense(x)], axis=1)))
SLICE_PAD = Case("slice_pad", lambda x: _cat(
    dense(x)[:, 1:6:2], dense(x)[:, 2:4],
    lax.pad(dense(x), 0.7, [(0, 0, 0), (2, -1, 1)]),  # interior and negative padding
    lax.pad(dense(x), 0.0, [(0, 0, 0), (-2, 3, 0)]),
    jnp.pad(dense(x), ((0, 0), (1, 2)), constant_values=-0.4)))
REDUCE = Case("reduce_sum", lambda x: _cat(
    jnp.sum(dense(x), -1), jnp.sum(dense(x).reshape(-1, 2, 3), 1),
    jnp.cumsum(dense(x), -1), lax.cumsum(dense(x), axis=1, reverse=True)))
AVG_POOL = Case("avg_pool", lambda x: _cat(
    nn.avg_pool(conv_nhwc(x), (2, 2), strides=(1, 1)),
    nn.avg_pool(conv_nhwc(x), (3, 3), strides=(2, 2), padding="SAME")), "img")
IDENTITY = Case("identity", lambda x: _cat(jnp.copy(dense(x)), lax.stop_gradient(dense(x))))
CONVERT = Case("convert", lambda x: _cat(dense(x).astype(jnp.bfloat16).astype(jnp.float32),
                                         dense(x).astype(jnp.float16).astype(jnp.float32)))
INDEXING = Case("indexing", lambda x: _cat(
    dense(x)[:, IDX],
    lax.dynamic_slice_in_dim(dense(x), 2, 3, axis=1),
    jnp.where(np.array([True, False, True, True, False, False]), dense(x), 2.0 * dense(x, W2) - 1.0)))
UPDATE = Case("update", lambda x: _cat(
    lax.dynamic_update_slice_in_dim(dense(x), -dense(x, W2)[:, :2], 3, axis=1),
    lax.dynamic_update_slice_in_dim(jnp.zeros_like(x) + C6, dense(x)[:, :2], 1, axis=1),
    dense(x).at[:, np.array([1, 3, 3])].add(dense(x, W2)[:, :3]),
    (jnp.zeros_like(x) + C6).at[:, np.array([0, 0, 5])].add(dense(x)[:, 2:5])))
ADD_ANY = Case("add_any", _add_any)
RELU = Case("relu", lambda x: _cat(jax.nn.relu(dense(x)), jnp.maximum(dense(x, W2), 0.0),
                                   jnp.maximum(dense(x), C6)))
MIN_CLIP = Case("min_clip", lambda x: _cat(
    jnp.minimum(dense(x), 0.2), jnp.minimum(dense(x, W2), C6), jnp.clip(dense(x), -0.3, 0.4),
    jax.nn.relu6(8.0 * dense(x))))
LEAKY = Case("leaky_relu", _leaky)
ABS = Case("abs", lambda x: jnp.abs(dense(x)))
MAX_POOL = Case("max_pool", lambda x: _cat(
    nn.max_pool(conv_nhwc(x), (2, 2), strides=(1, 1)),  # overlapping windows
    nn.max_pool(conv_nhwc(x), (3, 3), strides=(1, 1), padding="SAME"),
    nn.max_pool(conv_nhwc(x), (2, 2), strides=(2, 2))), "img")
REDUCE_MAX = Case("reduce_max", lambda x: _cat(
    jnp.max(dense(x).reshape(-1, 2, 3), axis=-1), jnp.max(dense(x).reshape(-1, 2, 3), axis=1)))
BATCH_NORM = Case("batch_norm", lambda x: jax.nn.relu(_BN.apply(_BN_VARS, dense(x))))

CASES = {
    P.dot_general_p: [MLP, ARITH],
    P.conv_general_dilated_p: [CONV],
    P.add_p: [ARITH, BATCH_NORM],
    P.sub_p: [ARITH],
    P.neg_p: [ARITH],
    P.mul_p: [ARITH, BATCH_NORM],
    P.div_p: [ARITH, AVG_POOL],
    P.broadcast_in_dim_p: [STRUCTURAL],
    P.reshape_p: [STRUCTURAL],
    P.transpose_p: [STRUCTURAL, CONV],
    P.squeeze_p: [STRUCTURAL],
    P.rev_p: [STRUCTURAL],
    P.concatenate_p: [CONCAT],
    P.slice_p: [SLICE_PAD],
    P.pad_p: [SLICE_PAD],
    P.reduce_sum_p: [REDUCE],
    P.cumsum_p: [REDUCE],
    P.reduce_window_sum_p: [AVG_POOL],
    P.convert_element_type_p: [CONVERT],
    P.copy_p: [IDENTITY],
    P.stop_gradient_p: [IDENTITY],
    P.gather_p: [INDEXING],
    P.dynamic_slice_p: [INDEXING],
    P.select_n_p: [INDEXING],
    P.dynamic_update_slice_p: [UPDATE],
    P.scatter_add_p: [UPDATE],
    P.add_jaxvals_p: [ADD_ANY],
    P.max_p: [RELU, MIN_CLIP, MLP],
    P.min_p: [MIN_CLIP],
    leaky_relu_p: [LEAKY],
    P.abs_p: [ABS],
    P.reduce_window_max_p: [MAX_POOL],
    P.reduce_max_p: [REDUCE_MAX],
}
ALL_CASES = list({c.name: c for cs in CASES.values() for c in cs}.values())
NONLINEAR = [MLP, CONV, RELU, MIN_CLIP, LEAKY, ABS, MAX_POOL, REDUCE_MAX, BATCH_NORM]

SETS = {
    "linf": lambda x: jaxlirpa.LinfBall(EPS),
    "linf01": lambda x: jaxlirpa.LinfBall(EPS, lower=0.0, upper=1.0),
    "box": lambda x: jaxlirpa.Box(x - 0.05, x + 0.2),
    "l2": lambda x: jaxlirpa.L2Ball(0.4),
    "l1": lambda x: jaxlirpa.L1Ball(0.6),
}

# (case, method, set) -> reason: confirmed library bugs, kept as strict xfails.
KNOWN: dict[tuple[str, str, str], str] = {}


def _params(cases, methods, set_names, jits=(False,)):
    out = []
    for c in cases:
        for m in methods:
            for s in set_names:
                for j in jits:
                    reason = KNOWN.get((c.name, m, s))
                    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                    out.append(pytest.param(c, m, s, j, marks=marks,
                                            id=f"{c.name}-{m}-{s}" + ("-jit" if j else "")))
    return out


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(1), len(SHAPES))
    return {k: jax.random.uniform(key, shape, jnp.float32) for key, (k, shape) in zip(keys, SHAPES.items())}


def _bound(fn, x, S, method, jit):
    if not jit:
        return jaxlirpa.bound(fn, x, S, method=method)
    # As in a training step: the bound traced inside jit, around a jitted model.
    return jax.jit(lambda x: jaxlirpa.bound(jax.jit(fn), x, S, method=method))(x)


def _check(case, method, set_name, jit, inputs, **kw):
    x = inputs[case.shape]
    S = SETS[set_name](x)
    b = _bound(case.fn, x, S, method, jit)
    y = case.fn(x)
    assert b.lower.shape == b.upper.shape == y.shape
    lo, hi, y = map(np.asarray, (b.lower, b.upper, y))
    assert np.all(lo <= hi), f"lower > upper at {np.argwhere(lo > hi)[:5]}"
    tol = 1e-5 * (1 + np.maximum(np.abs(lo), np.abs(hi)))
    assert np.all(lo - tol <= y) and np.all(y <= hi + tol), "bounds do not contain fn(x)"
    assert_sound(case.fn, x, S, method=method, bounds=b, **CHECK, **kw)


# ---------------------------------------------------------------- registry


def _perturbed_prims(case):
    shape = SHAPES[case.shape]
    graph, _ = trace(lambda xi: case.fn(xi[None])[0], [jax.ShapeDtypeStruct(shape[1:], jnp.float32)], [True])
    return {e.prim for e in graph.eqns if any(graph.is_perturbed(v) for v in e.inputs)}


def test_every_rule_has_a_case():
    missing = [p.name for p in RULES if not CASES.get(p)]
    assert not missing, f"registered primitives without a soundness case in CASES: {missing}"


@pytest.mark.parametrize("prim", list(CASES), ids=lambda p: p.name)
def test_case_exercises_its_primitive(prim):
    """Each listed case really applies the primitive to a perturbed value."""
    assert prim in RULES, f"{prim.name} has a case but no rule"
    for case in CASES[prim]:
        assert prim in _perturbed_prims(case), f"case {case.name} does not exercise {prim.name}"


# ---------------------------------------------------------------- soundness


@pytest.mark.parametrize("case,method,set_name,jit", _params(ALL_CASES, METHODS, ["linf"], (False, True)))
def test_sound_linf(case, method, set_name, jit, inputs):
    _check(case, method, set_name, jit, inputs)


@pytest.mark.parametrize("case,method,set_name,jit", _params(ALL_CASES, METHODS, ["linf01", "box"]))
def test_sound_clipped_and_box(case, method, set_name, jit, inputs):
    """Boxes reuse the compiled L-inf programs (both are p = inf regions)."""
    _check(case, method, set_name, jit, inputs)


@pytest.mark.parametrize("case,method,set_name,jit", _params(NONLINEAR, METHODS, ["l2"]))
def test_sound_l2(case, method, set_name, jit, inputs):
    _check(case, method, set_name, jit, inputs)


@pytest.mark.parametrize("case,method,set_name,jit", _params([MLP, MAX_POOL], ["crown", "ibp"], ["l1"]))
def test_sound_l1(case, method, set_name, jit, inputs):
    _check(case, method, set_name, jit, inputs)


@pytest.mark.parametrize("case", [MLP, MAX_POOL, LEAKY], ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_sound_with_spec(case, method, inputs):
    """``spec @ fn``: fused into the last linear layers for IBP and forward."""
    x = inputs[case.shape]
    out = int(np.prod(case.fn(x).shape[1:]))
    C = jnp.asarray(np.random.default_rng(3).normal(size=(3, out)), jnp.float32)
    b = assert_sound(case.fn, x, EPS, method=method, spec=C, **CHECK)
    y = np.asarray(case.fn(x)).reshape(x.shape[0], -1) @ np.asarray(C).T
    assert b.lower.shape == (x.shape[0], 3)
    assert np.all(b.lower <= y + 1e-5) and np.all(y <= b.upper + 1e-5)


def test_sound_with_batched_spec(inputs):
    x = inputs["vec"]
    C = jaxlirpa.margin_spec(jnp.asarray([1, 4]), 6)
    b = assert_sound(MLP.fn, x, EPS, method="crown", spec=C, **CHECK)
    assert b.lower.shape == (2, 5)


# ---------------------------------------------------------------- exact values


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("set_name", ["linf", "l2", "l1"])
def test_linear_layer_exact(method, set_name):
    """One linear layer: x0 W + b -/+ eps ||W_col||_dual, exactly, for every method
    (IBP is exact here too: the affine prefix of an L2/L1 set is bounded by its dual norm)."""
    rng = np.random.default_rng(5)
    W = rng.normal(size=(5, 3)).astype(np.float32)
    b = np.asarray([0.1, -0.2, 0.3], np.float32)
    x = jnp.asarray(rng.uniform(size=(2, 5)), jnp.float32)
    eps = 0.2
    S = {"linf": jaxlirpa.LinfBall(eps), "l2": jaxlirpa.L2Ball(eps), "l1": jaxlirpa.L1Ball(eps)}[set_name]
    dual = {"linf": np.abs(W).sum(0), "l2": np.sqrt((W ** 2).sum(0)), "l1": np.abs(W).max(0)}[set_name]
    fn = lambda z: z @ W + b
    res = assert_sound(fn, x, S, method=method, **CHECK)
    centre = np.asarray(x) @ W + b
    np.testing.assert_allclose(res.lower, centre - eps * dual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.upper, centre + eps * dual, rtol=1e-5, atol=1e-5)


X_RELU = jnp.asarray([[1.0, -1.0, 0.5, -2.5]])  # with eps 2: [-1, 3], [-3, 1], [-1.5, 2.5], [-4.5, -0.5]


@pytest.mark.parametrize("method", METHODS)
def test_relu_triangle_relaxation(method):
    """relu on known intervals. Elementwise, CROWN concretises the triangle: the chord
    ``u (x - l) / (u - l)`` above (max u) and, below, ``x`` where u > -l (min l) else 0;
    IBP gives [relu(l), relu(u)]. Forward and CROWN-IBP agree with CROWN on one layer."""
    b = assert_sound(jax.nn.relu, X_RELU, 2.0, method=method, **CHECK)
    if method == "ibp":
        np.testing.assert_allclose(b.lower, [[0, 0, 0, 0]])
    else:
        np.testing.assert_allclose(b.lower, [[-1, 0, -1.5, 0]])
    np.testing.assert_allclose(b.upper, [[3, 1, 2.5, 0]])


@pytest.mark.parametrize("method", METHODS)
def test_relu_triangle_combination(method):
    """y = r0 - r1 + 2 r2 + r3 with r = relu(x) on the intervals above. CROWN: upper
    lines (0.75x+0.75, 0.625x+0.9375) for positive weights and the lower line of r1
    (slope 0) give max 3 + 5 = 8; lower: x0 + (-(0.25 x1 + 0.75)) + 2 x2 gives -1 - 1 - 3 = -5.
    IBP: [0 - 1 + 0, 3 - 0 + 5] = [-1, 8] (tighter below, as happens for CROWN)."""
    c = jnp.asarray([1.0, -1.0, 2.0, 1.0])
    b = assert_sound(lambda x: jax.nn.relu(x) @ c[:, None], X_RELU, 2.0, method=method, **CHECK)
    expected_lower = -1.0 if method == "ibp" else -5.0
    np.testing.assert_allclose(b.lower, [[expected_lower]], rtol=1e-6)
    np.testing.assert_allclose(b.upper, [[8.0]], rtol=1e-6)


# ---------------------------------------------------------------- the helpers themselves


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sample_points_in_set(set_name, shape, inputs):
    x = inputs[shape]
    S = SETS[set_name](x)
    pts = sample_points(S, x, jax.random.key(2), 64)
    assert pts.shape == (64, *x.shape)
    region = S.region(x)
    inside = jax.vmap(jax.vmap(lambda r, z: r.contains(z, 1e-5)), in_axes=(None, 0))(region, pts)
    assert bool(jnp.all(inside))
    np.testing.assert_allclose(pts[0], np.clip(region.center, region.lo, region.hi))
    # Not all at the centre: the samples spread over the set.
    assert float(jnp.min(jnp.std(pts, axis=0))) > 0
    again = sample_points(region, x, jax.random.key(2), 64)  # a Region works too
    np.testing.assert_array_equal(pts, again)


@pytest.mark.parametrize("set_name", list(SETS))
def test_assert_sound_finds_the_maximum(set_name, inputs):
    """A linear function's maximum over each set is a vertex / sphere point that random
    samples miss; the attack must come within 1e-3 of it, so shrinking the exact bound
    by 1e-3 fails the check (and the exact bound passes)."""
    x = inputs["vec"]
    w = np.asarray([0.3, -1.0, 0.5, 2.0, -0.2, 0.7], np.float32)
    fn = lambda z: (z @ w)[:, None]
    S = SETS[set_name](x)
    exact = assert_sound(fn, x, S, method="crown", **CHECK)
    shrunk = jaxlirpa.Bounds(exact.lower + 1e-3, exact.upper - 1e-3)
    with pytest.raises(AssertionError, match="Unsound bounds"):
        assert_sound(fn, x, S, method="crown", bounds=shrunk, n_samples=8, attack_steps=10)
    # Upper side alone, to be sure each direction is attacked.
    with pytest.raises(AssertionError, match="above upper"):
        assert_sound(fn, x, S, bounds=jaxlirpa.Bounds(exact.lower, exact.upper - 1e-3), n_samples=8,
                     attack_steps=10)


def test_assert_sound_reports_nan_bounds(inputs):
    x = inputs["vec"]
    nan = jaxlirpa.Bounds(jnp.full((2, 6), jnp.nan), jnp.zeros((2, 6)))
    with pytest.raises(AssertionError, match="NaN"):
        assert_sound(ABS.fn, x, EPS, bounds=nan, **CHECK)
