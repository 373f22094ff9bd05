"""Registry-driven soundness suite: every rule in ``jaxlirpa.rules.base.RULES`` is
exercised by a tiny function, under every method, without and (most) with ``jax.jit``,
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
import functools
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlirpa
from jaxlirpa._compat import lax_primitives as P, stack_p
from jaxlirpa.graph import leaky_relu_p, trace
from jaxlirpa.patterns import gelu_p, normalize_p, silu_p, softmax_p
from jaxlirpa.rules.base import RULES
from jaxlirpa.testing import assert_sound, sample_points

METHODS = ["ibp", "crown", "crown-ibp", "forward"]
EPS = 0.15
CHECK = dict(n_samples=128, attack_steps=10, max_coords=32)
XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False} | (
    {"xla_cpu_use_fusion_emitters": True} if "xla_cpu_use_fusion_emitters" in os.environ.get("XLA_FLAGS", "") else {})
"""What conftest's ``XLA_FLAGS`` change, as XLA has them by default."""
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


def _convert_exact(h):
    """A float32 -> float32 conversion (dropping weak type), as jnp emits for some dtype
    promotions; ``astype`` to the same dtype would not emit one."""
    return lax.convert_element_type_p.bind(h, new_dtype=jnp.dtype(jnp.float32), weak_type=True, sharding=None)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    shape: str = "vec"

    def __repr__(self):
        return self.name


def _linear(x):
    h, h2 = dense(x), dense(x, W2)
    add_any = jax.linear_transpose(lambda t: t * 2.0 + t * 3.0, h)(h)[0]  # fan-out transposed: add_any
    return _cat(h + C6, h + h2, C6 - h, h - h2, -h, h * 2.5, C6 * h, h / 3.0, h / C6_POS,
                jnp.sum(h, -1), jnp.sum(h.reshape(-1, 2, 3), 1), jnp.cumsum(h, -1),
                lax.cumsum(h, axis=1, reverse=True), jnp.copy(h), lax.stop_gradient(h), add_any,
                _convert_exact(h))


def _shape(x):
    h = dense(x)
    n = x.shape[0]
    return _cat(
        h.reshape(-1, 2, 3).transpose(0, 2, 1),
        jnp.squeeze(h.reshape(-1, 1, 6), 1),
        jnp.broadcast_to(jnp.expand_dims(h, 1), (n, 2, 6)),
        jnp.flip(h.reshape(-1, 2, 3), (1, 2)),
        jnp.concatenate([h, jnp.broadcast_to(C6, (n, 6))], axis=1),  # with a constant
        jnp.concatenate([h, -h, h], axis=1),  # with itself
        h[:, 1:6:2], h[:, 2:4],
        lax.pad(h, 0.7, [(0, 0, 0), (2, -1, 1)]),  # low, negative high, interior padding
        lax.pad(h, 0.0, [(0, 0, 0), (-2, 3, 0)]),
        jnp.pad(h, ((0, 0), (1, 2)), constant_values=-0.4))


def _index(x):
    h, h2 = dense(x), dense(x, W2)
    base = jnp.zeros_like(x) + C6  # a constant operand, batch-shaped
    return _cat(
        h[:, IDX],  # gather with repeated indices
        lax.dynamic_slice_in_dim(h, 2, 3, axis=1),
        jnp.where(np.array([True, False, True, True, False, False]), h, 2.0 * h2 - 1.0),
        lax.dynamic_update_slice_in_dim(h, -h2[:, :2], 3, axis=1),  # both perturbed
        lax.dynamic_update_slice_in_dim(base, h[:, :2], 1, axis=1),  # constant base
        h.at[:, np.array([1, 3, 3])].add(h2[:, :3]),
        base.at[:, np.array([0, 0, 5])].add(h[:, 2:5]))


def _structural(x):
    return _cat(_shape(x), _index(x))


def _conv(x):
    a = conv_nhwc(x)
    return _cat(jax.nn.relu(a), jax.nn.relu(conv_nchw(x)),
                nn.avg_pool(a, (2, 2), strides=(1, 1)),
                nn.avg_pool(a, (3, 3), strides=(2, 2), padding="SAME"))


def _mlp(x):
    h = _BN.apply(_BN_VARS, dense(x))  # inference-mode batch norm with non-trivial statistics
    return dense(jax.nn.relu(h), W2)


def _max_min(x):
    h = dense(x)
    return _cat(jax.nn.relu(h), jnp.maximum(h, 0.0), jnp.maximum(h, C6),  # max with a nonzero array
                jnp.minimum(h, 0.2), jnp.minimum(h, C6), jnp.clip(h, -0.3, 0.4), jax.nn.relu6(8.0 * h))


def _leaky_abs(x):
    h = dense(x)
    return _cat(jax.nn.leaky_relu(h, 0.01), jax.nn.leaky_relu(h, 0.3), jax.nn.leaky_relu(h, 2.0),
                jnp.where(h > 0, h, 0.2 * h), jnp.abs(h))


def _max_pool(x):
    a = conv_nhwc(x)
    return _cat(nn.max_pool(a, (2, 2), strides=(1, 1)),  # overlapping windows
                nn.max_pool(a, (3, 3), strides=(2, 2), padding="SAME"),  # padded, strided
                jnp.max(a, axis=-1))  # reduce_max over the channels


def _convex(x):
    h = dense(x)
    p = 1.5 + 0.3 * h  # positive on the set: the domain of log, sqrt, rsqrt, negative and fractional powers
    return _cat(jnp.exp(h), jnp.exp2(h), jnp.expm1(h), jnp.log(p), jnp.log1p(0.3 * h), jnp.sqrt(p),
                lax.rsqrt(p), jnp.square(h), h ** 3, p ** 2.5, 2.0 ** h)


def _smooth(x):
    h = dense(x)
    wide = 3.0 * h  # intervals up to a period wide
    return _cat(jnp.tanh(h), jax.nn.sigmoid(2.0 * h), jax.scipy.special.erf(h), jnp.sin(wide), jnp.cos(wide))


def _recurrent(x):
    """A scan (unrolled: stacks its outputs), products of two perturbed tensors, c / x."""
    h = dense(x)

    def step(c, xt):
        c = jnp.tanh(0.5 * c + xt)
        return c, c * xt

    c, ys = lax.scan(step, h[:, 0], jnp.moveaxis(h[:, :3], 1, 0))
    outer = h[:, :3, None] @ h[:, None, 3:6]  # dot_general of two perturbed operands, batched
    return _cat(c, jnp.moveaxis(ys, 0, 1), outer, h * h, 1.0 / (2.0 + h * h))


def _composite(x):
    """Fused composites (jaxlirpa.patterns): softmax over either axis, layer norm, gelu, silu."""
    h = dense(x)
    grid = h.reshape(-1, 2, 3) * 2.0
    ln = h - h.mean(-1, keepdims=True)
    return _cat(jax.nn.softmax(grid, axis=-1), jax.nn.softmax(grid, axis=1),
                ln / jnp.sqrt((ln ** 2).mean(-1, keepdims=True) + 1e-5),
                jax.nn.gelu(2.0 * h, approximate=False), jax.nn.gelu(2.0 * h), jax.nn.silu(3.0 * h))


def _two_perturbed_control(x):
    """``div``/``max``/``min`` of two perturbed operands with implicit size-1 broadcasting
    (rewritten while tracing), ``cond``/``switch`` with indices known while tracing (a literal,
    one computed from a constant), ``fori_loop`` with ``jnp.int32`` bounds (a ``while``,
    unrolled; reverse-mode AD refuses it, hence the ``stop_gradient``, which bounds ignore)."""
    h = dense(x)
    a, b = h.reshape(-1, 2, 3), (1.5 + jnp.tanh(h)).reshape(-1, 2, 3)[:, :, :1]
    c = lax.cond(True, jnp.tanh, jnp.log, h) + lax.switch(jnp.argmax(C6), [jnp.log, jnp.cos, jnp.sin, jax.nn.relu], h)
    w = lax.fori_loop(jnp.int32(0), jnp.int32(2), lambda i, t: jnp.tanh(t @ W2), lax.stop_gradient(h))
    return _cat(a / b, jnp.maximum(a, b), jnp.minimum(b, a), jnp.maximum(h, h), jnp.minimum(b, C6.reshape(2, 3)), c, w)


LINEAR = Case("linear", _linear)
STRUCTURAL = Case("structural", _structural)
CONV = Case("conv", _conv, "img")
MLP = Case("mlp", _mlp)
MAX_MIN = Case("max_min", _max_min)
LEAKY_ABS = Case("leaky_abs", _leaky_abs)
MAX_POOL = Case("max_pool", _max_pool, "img")
CONVEX = Case("convex", _convex)
SMOOTH = Case("smooth", _smooth)
RECURRENT = Case("recurrent", _recurrent)
TWO_PERTURBED_CONTROL = Case("two_perturbed_control", _two_perturbed_control)
COMPOSITE = Case("composite", _composite)
CONVERT_ROUNDING = Case("convert_rounding", lambda x: _cat(dense(x).astype(jnp.bfloat16).astype(jnp.float32),
                                                           dense(x).astype(jnp.float16).astype(jnp.float32)))

CASES = {
    P.dot_general_p: [MLP, LINEAR, RECURRENT],
    P.conv_general_dilated_p: [CONV, MAX_POOL],
    P.add_p: [LINEAR, MLP],
    P.sub_p: [LINEAR, MLP],
    P.neg_p: [LINEAR],
    P.mul_p: [LINEAR, MLP, RECURRENT],
    P.div_p: [LINEAR, CONV, RECURRENT, TWO_PERTURBED_CONTROL],
    P.broadcast_in_dim_p: [STRUCTURAL],
    P.reshape_p: [STRUCTURAL],
    P.transpose_p: [STRUCTURAL, CONV],
    P.squeeze_p: [STRUCTURAL],
    P.rev_p: [STRUCTURAL],
    P.concatenate_p: [STRUCTURAL],
    P.slice_p: [STRUCTURAL],
    P.pad_p: [STRUCTURAL],
    P.gather_p: [STRUCTURAL],
    P.dynamic_slice_p: [STRUCTURAL],
    P.select_n_p: [STRUCTURAL],
    P.dynamic_update_slice_p: [STRUCTURAL],
    P.scatter_add_p: [STRUCTURAL],
    P.reduce_sum_p: [LINEAR],
    P.cumsum_p: [LINEAR],
    P.copy_p: [LINEAR],
    P.stop_gradient_p: [LINEAR],
    P.add_jaxvals_p: [LINEAR],
    P.convert_element_type_p: [LINEAR],
    P.reduce_window_sum_p: [CONV],
    P.max_p: [MAX_MIN, MLP, CONV, TWO_PERTURBED_CONTROL],
    P.min_p: [MAX_MIN],
    leaky_relu_p: [LEAKY_ABS],
    P.abs_p: [LEAKY_ABS],
    P.reduce_window_max_p: [MAX_POOL],
    P.reduce_max_p: [MAX_POOL],
    P.tanh_p: [SMOOTH],
    P.logistic_p: [SMOOTH],
    P.erf_p: [SMOOTH],
    P.exp_p: [CONVEX],
    P.exp2_p: [CONVEX],
    P.expm1_p: [CONVEX],
    P.log_p: [CONVEX],
    P.log1p_p: [CONVEX],
    P.sqrt_p: [CONVEX],
    P.rsqrt_p: [CONVEX],
    P.square_p: [CONVEX],
    P.integer_pow_p: [CONVEX],
    P.pow_p: [CONVEX],
    P.sin_p: [SMOOTH],
    P.cos_p: [SMOOTH],
    softmax_p: [COMPOSITE],
    normalize_p: [COMPOSITE],
    gelu_p: [COMPOSITE],
    silu_p: [COMPOSITE],
    **({stack_p: [RECURRENT]} if stack_p is not None else {}),
}
ALL_CASES = [LINEAR, STRUCTURAL, CONV, MLP, MAX_MIN, LEAKY_ABS, MAX_POOL, SMOOTH, CONVEX, RECURRENT,
             TWO_PERTURBED_CONTROL, COMPOSITE]
assert {c.name for cs in CASES.values() for c in cs} == {c.name for c in ALL_CASES}
L2_CASES = [MLP]
# The core cases also run with every method inside a user's jit, and with the clipped ball and
# the box. ``bound`` compiles its own program either way, so a rule's arithmetic is the same;
# what jit adds is tracing ``bound`` itself with abstract inputs, and a set enters only where the
# input is concretised: neither depends on the primitive. Compiling is most of this module's
# time, so the later rule families (smooth, convex, recurrent, two perturbed operands and
# control flow, composite patterns) run on the L-inf ball, and inside jit with IBP only.
CORE_CASES = [LINEAR, STRUCTURAL, CONV, MLP, MAX_MIN, LEAKY_ABS, MAX_POOL]
SETS = {
    "linf": lambda x: jaxlirpa.LinfBall(EPS),
    "linf01": lambda x: jaxlirpa.LinfBall(EPS, lower=0.0, upper=1.0),  # clipped: x is uniform in [0, 1]
    "box": lambda x: jaxlirpa.Box(x - 0.05, x + 0.2),
    "l2": lambda x: jaxlirpa.L2Ball(0.4),
    "l1": lambda x: jaxlirpa.L1Ball(0.6),
}

# (case, method, set) -> reason: confirmed library bugs, kept as strict xfails.
KNOWN: dict[tuple[str, str, str], str] = {}


def _param(c, m, s, jit=False):
    reason = KNOWN.get((c.name, m, s))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(c, m, s, marks=marks, id=f"{c.name}-{m}-{s}" + ("-jit" if jit else ""))


def _grid():
    """(case, method, set) without jit, grouped by case and method so that the L-inf-shaped
    sets (clipped ball, box) reuse the programs just compiled for the L-inf ball. A set only
    enters where the input is concretised, not in any rule, so the clipped ball and the box
    run on the core cases (CORE_CASES) only."""
    out = []
    for c in ALL_CASES:
        for m in METHODS:
            sets = ["linf", "linf01", "box"] if c in CORE_CASES else ["linf"]
            if c in L2_CASES:
                sets.append("l2")
            if c is MLP and m == "crown":
                sets.append("l1")
            out += [_param(c, m, s) for s in sets]
    return out


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(1), len(SHAPES))
    return {k: jax.random.uniform(key, shape, jnp.float32) for key, (k, shape) in zip(keys, SHAPES.items())}


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    """Compiling dominates this module: spare XLA's LLVM optimisations for it (about half
    the compile time). XLA's graph passes still run; ``test_sound_default_compiler``
    checks a few programs compiled with XLA's default options."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


# ---------------------------------------------------------------- registry


def _perturbed_prims(case):
    shape = SHAPES[case.shape]
    graph, _ = trace(lambda xi: case.fn(xi[None])[0], [jax.ShapeDtypeStruct(shape[1:], jnp.float32)], [True])
    return {e.prim for e in graph.eqns if any(graph.is_perturbed(v) for v in e.inputs)}


def test_every_rule_has_a_case():
    missing = [p.name for p in RULES if not CASES.get(p)]
    assert not missing, f"registered primitives without a soundness case in CASES: {missing}"


def test_every_method_is_tested():
    """A new bound method fails here until this module runs it."""
    from jaxlirpa.methods import METHODS as LIBRARY_METHODS
    untested = set(LIBRARY_METHODS) - set(METHODS) - {"alpha-crown"}  # alpha-crown: test_sound_alpha_crown
    assert not untested, f"methods without soundness tests: {sorted(untested)}"


@pytest.mark.parametrize("prim", list(CASES), ids=lambda p: p.name)
def test_case_exercises_its_primitive(prim):
    """Each listed case really applies the primitive to a perturbed value."""
    assert prim in RULES, f"{prim.name} has a case but no rule"
    for case in CASES[prim]:
        assert prim in _perturbed_prims(case), f"case {case.name} does not exercise {prim.name}"


# ---------------------------------------------------------------- soundness


@functools.cache
def _jitted(case):
    return jax.jit(case.fn)  # one compile per case; eager evaluation compiles every op on its own


def _check(case, method, S, b, x):
    """lower <= upper, fn(x) inside, and no sampled or attacked point of the set outside."""
    y = _jitted(case)(x)
    assert b.lower.shape == b.upper.shape == y.shape
    lo, hi, y = map(np.asarray, (b.lower, b.upper, y))
    assert np.all(lo <= hi), f"lower > upper at {np.argwhere(lo > hi)[:5].tolist()}"
    tol = 1e-5 * (1 + np.maximum(np.abs(lo), np.abs(hi)))
    assert np.all(lo - tol <= y) and np.all(y <= hi + tol), "bounds do not contain fn(x)"
    assert_sound(case.fn, x, S, method=method, bounds=b, **CHECK)


@pytest.mark.parametrize("case,method,set_name", _grid())
def test_sound(case, method, set_name, inputs):
    x = inputs[case.shape]
    S = SETS[set_name](x)
    _check(case, method, S, jaxlirpa.bound(case.fn, x, S, method=method), x)


@pytest.mark.parametrize("case,method,set_name", [
    _param(c, m, "linf", jit=True) for c in ALL_CASES for m in (METHODS if c in CORE_CASES else ["ibp"])])
def test_sound_jit(case, method, set_name, inputs):
    """As in a training step: the bound traced inside jit, around a jitted model."""
    x = inputs[case.shape]
    S = SETS[set_name](x)
    b = jax.jit(lambda z: jaxlirpa.bound(jax.jit(case.fn), z, S, method=method))(x)
    _check(case, method, S, b, x)


def test_sound_alpha_crown(inputs):
    """alpha-CROWN's optimised slopes stay sound and, kept best from CROWN's own start, no looser."""
    x = inputs["vec"]
    b = jaxlirpa.bound(MLP.fn, x, EPS, method="alpha-crown")
    assert_sound(MLP.fn, x, EPS, method="alpha-crown", bounds=b, **CHECK)
    crown = jaxlirpa.bound(MLP.fn, x, EPS, method="crown")
    tol = 1e-5 * (1 + np.maximum(np.abs(np.asarray(crown.lower)), np.abs(np.asarray(crown.upper))))
    assert np.all(np.asarray(b.lower) >= np.asarray(crown.lower) - tol)
    assert np.all(np.asarray(b.upper) <= np.asarray(crown.upper) + tol)


@pytest.mark.parametrize("method", ["crown"])
def test_sound_default_compiler(method, inputs):
    """As above, compiled with XLA's default options (``conftest`` and this module's fixture
    set cheaper ones for the rest of the suite), alone (a user's ``jax.jit``) and with the
    options jaxlirpa compiles its own programs with (``bound`` called outside ``jax.jit``)."""
    fn = lambda x: _mlp(x) + 0.0
    x = inputs["vec"]
    for options in (XLA_DEFAULTS, XLA_DEFAULTS | (jaxlirpa.compiler_options(method) or {})):
        b = jax.jit(lambda z: jaxlirpa.bound(fn, z, EPS, method=method), compiler_options=options)(x)
        assert_sound(fn, x, EPS, method=method, bounds=b, **CHECK)
        assert np.all(b.lower <= fn(x) + 1e-5) and np.all(fn(x) <= b.upper + 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_sound_with_spec(method, inputs):
    """``spec @ fn``: fused into the last linear layers for IBP and forward."""
    x = inputs["vec"]
    C = jnp.asarray(np.random.default_rng(3).normal(size=(3, 6)), jnp.float32)
    b = assert_sound(MLP.fn, x, EPS, method=method, spec=C, **CHECK)
    y = np.asarray(_jitted(MLP)(x)) @ np.asarray(C).T
    assert b.lower.shape == (x.shape[0], 3)
    assert np.all(b.lower <= y + 1e-5) and np.all(y <= b.upper + 1e-5)


@pytest.mark.parametrize("method", ["forward"])
def test_sound_with_batched_spec(method, inputs):
    x = inputs["vec"]
    C = jaxlirpa.margin_spec(jnp.asarray([1, 4]), 6)
    b = assert_sound(MLP.fn, x, EPS, method=method, spec=C, **CHECK)
    assert b.lower.shape == (2, 5)


# ---------------------------------------------------------------- exact values


@pytest.mark.parametrize("method,set_name", [(m, "linf") for m in METHODS]
                         + [(m, "l2") for m in ("ibp", "crown")])
def test_linear_layer_exact(method, set_name):
    """One linear layer: CROWN, CROWN-IBP and forward give exactly x0 W + b -/+ eps ||W_col||_dual
    (``eps |W|`` summed for L-inf). IBP is exact for L-inf; for L2/L1 jaxlirpa uses the dual
    norm only at the inputs of nonlinear rules, so on a purely affine graph IBP lies between
    the exact interval and the bounding box's."""
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
    if method == "ibp" and set_name != "linf":
        box = eps * np.abs(W).sum(0)
        assert np.all(res.lower <= centre - eps * dual + 1e-5) and np.all(res.upper >= centre + eps * dual - 1e-5)
        assert np.all(res.lower >= centre - box - 1e-5) and np.all(res.upper <= centre + box + 1e-5)
        return
    np.testing.assert_allclose(res.lower, centre - eps * dual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.upper, centre + eps * dual, rtol=1e-5, atol=1e-5)


X_RELU = jnp.asarray([[1.0, -1.0, 0.5, -2.5]])  # with eps 2: [-1, 3], [-3, 1], [-1.5, 2.5], [-4.5, -0.5]
C_RELU = jnp.asarray([[1.0], [-1.0], [2.0], [1.0]])


@pytest.mark.parametrize("method", METHODS)
def test_relu_triangle_relaxation(method):
    """relu on known intervals, and y = r0 - r1 + 2 r2 + r3 of those relus.

    Elementwise, CROWN concretises the triangle: the chord ``u (x - l) / (u - l)``
    above (max u) and, below, ``x`` where u > -l (min l) else 0; IBP gives
    [relu(l), relu(u)]. For y, CROWN takes the upper lines 0.75 x0 + 0.75 and
    0.625 x2 + 0.9375 and the lower line 0 of r1: max 3 + 5 = 8; below, x0,
    -(0.25 x1 + 0.75) and 2 x2: min -1 - 1 - 3 = -5. IBP: [0 - 1 + 0, 3 - 0 + 5] =
    [-1, 8]. Forward and CROWN-IBP agree with CROWN on one layer."""
    fn = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(x) @ C_RELU], axis=1)
    b = assert_sound(fn, X_RELU, 2.0, method=method, **CHECK)
    if method == "ibp":
        np.testing.assert_allclose(b.lower, [[0, 0, 0, 0, -1]], rtol=1e-6)
    else:
        np.testing.assert_allclose(b.lower, [[-1, 0, -1.5, 0, -5]], rtol=1e-6)
    np.testing.assert_allclose(b.upper, [[3, 1, 2.5, 0, 8]], rtol=1e-6)


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
    check = dict(n_samples=8, attack_steps=20)  # few samples: the attack must do the work
    exact = assert_sound(fn, x, S, method="crown", **check)
    with pytest.raises(AssertionError, match="Unsound bounds"):
        assert_sound(fn, x, S, bounds=jaxlirpa.Bounds(exact.lower + 1e-3, exact.upper - 1e-3), **check)
    with pytest.raises(AssertionError, match="above upper"):
        assert_sound(fn, x, S, bounds=jaxlirpa.Bounds(exact.lower, exact.upper - 1e-3), **check)
    with pytest.raises(AssertionError, match="below lower"):
        assert_sound(fn, x, S, bounds=jaxlirpa.Bounds(exact.lower + 1e-3, exact.upper), **check)


def test_assert_sound_reports_nan_bounds(inputs):
    x = inputs["vec"]
    nan = jaxlirpa.Bounds(jnp.full((2, 30), jnp.nan), jnp.zeros((2, 30)))
    with pytest.raises(AssertionError, match="NaN"):
        assert_sound(LEAKY_ABS.fn, x, EPS, bounds=nan, **CHECK)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_narrowing_cast_is_refused(method):
    """A cast to fewer mantissa bits rounds by up to half an ulp of the narrow type: no
    linear bound follows it, so jaxlirpa refuses it (this case once slipped through)."""
    x = jax.random.uniform(jax.random.key(0), (2, 6))
    with pytest.raises(jaxlirpa.UnsupportedPrimitiveError, match="bfloat16"):
        jaxlirpa.bound(CONVERT_ROUNDING.fn, x, jaxlirpa.LinfBall(EPS), method=method)
