"""Sanity checks of our reading of the auto_LiRPA oracle (../shared/oracle).

These tests do not exercise jaxlirpa: they check that ``tests/oracle.py`` rebuilds every
oracle model exactly (``fn(x0) == y0``) and reads the stored bounds, sets and intermediate
bounds the way they were written (spec rows vs outputs, interm node -> bounded value, eps and
norm), so that tests comparing jaxlirpa with the oracle compare like with like.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle  # noqa: E402

if not oracle.available():
    pytest.skip(f"oracle data not found at {oracle.ORACLE}", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ALL_CASES = oracle.case_names(include_perf=True)
N_POINTS = 16  # random points per set for the point-wise containment checks


def _scale(*arrays) -> float:
    return max([1.0] + [float(np.max(np.abs(a))) for a in arrays if a is not None])


@pytest.fixture(params=ALL_CASES)
def case(request) -> oracle.OracleCase:
    return oracle.load_case(request.param)


def _points(case: oracle.OracleCase, S: oracle.SetRef, n: int, seed: int = 0) -> np.ndarray:
    """(n * batch, *x0.shape[1:]) float32 points of the set: half inside, half on its boundary
    (box vertices for linf, sphere for l2), each centred on every batch element's x0."""
    rng = np.random.default_rng(seed)
    x0 = case.x0.astype(np.float64)
    shape = (n,) + x0.shape
    d = int(np.prod(x0.shape[1:]))
    eps = np.asarray(S.eps, np.float64)
    if S.norm == np.inf:
        u = rng.uniform(-1.0, 1.0, size=shape)
        u[n // 2 :] = np.sign(u[n // 2 :])
        delta = u * eps
    else:
        assert S.norm == 2.0
        g = rng.standard_normal(size=shape)
        flat = g.reshape(n, x0.shape[0], d)
        flat /= np.linalg.norm(flat, axis=-1, keepdims=True)
        r = rng.uniform(size=(n, x0.shape[0], 1)) ** (1.0 / d)
        r[n // 2 :] = 1.0 - 1e-6
        delta = (flat * r * eps).reshape(shape)
    pts = x0[None] + delta
    if S.x_L is not None:  # stay inside the stored float32 box
        pts = np.clip(pts, S.x_L[None], S.x_U[None])
    return pts.astype(np.float32).reshape((n * x0.shape[0],) + x0.shape[1:])


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


def test_forward_matches_y0(case):
    with jax.default_matmul_precision("highest"):
        y = np.asarray(jax.jit(lambda x: case.spec(case.fn(x)))(jnp.asarray(case.x0)))  # one compile, not one per op
    assert y.shape == case.y0.shape
    np.testing.assert_allclose(y, case.y0, rtol=0, atol=1e-5 * _scale(case.y0))


def test_case_metadata(case):
    meta = case.meta
    assert case.x0.dtype == np.float32
    assert case.x0.shape[0] == case.y0.shape[0] == meta["batch"]
    assert list(case.x0.shape) == meta["input_shape"]
    out = jax.eval_shape(case.fn, jax.ShapeDtypeStruct(case.x0.shape, jnp.float32))
    assert list(out.shape) == meta["output_shape"]
    n_out = int(np.prod(out.shape[1:]))
    if case.C is None:
        assert case.y0.shape == (case.x0.shape[0], n_out)
    else:
        assert case.C.shape == (case.x0.shape[0], case.y0.shape[1], n_out)
    assert case.y0.shape[1] == meta["n_spec"]
    # every param of the manifest is loaded with the manifest's shape
    assert {k: list(v.shape) for k, v in case.params.items()} == meta["params"]
    assert case.nodes[0]["op"] == "input"


def test_params_fn(case):
    apply, params = oracle.make_params_fn(case.name)
    x0 = jnp.asarray(case.x0)
    with jax.default_matmul_precision("highest"):
        y, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(case.spec(apply(p, x0)))))(params)
        np.testing.assert_allclose(float(y), float(case.y0.sum()), rtol=0, atol=1e-5 * _scale(case.y0) * case.y0.size)
    assert set(grads) == set(params)
    for k, g in grads.items():
        assert g.shape == params[k].shape
        assert np.all(np.isfinite(np.asarray(g))), k
    # BN buffers are params too (so they can be perturbed/differentiated), listed in buffers
    assert set(case.buffers) <= set(params)


# ---------------------------------------------------------------------------------------
# the stored bounds
# ---------------------------------------------------------------------------------------


def test_sets_and_methods(case):
    assert case.sets, "no perturbation set"
    for sname, S in case.sets.items():
        assert S.norm in (np.inf, 2.0)
        assert np.all(np.asarray(S.eps) > 0)
        assert S.methods, sname
        assert {"IBP", "CROWN"} <= set(S.methods)
        if S.norm == np.inf:
            np.testing.assert_array_equal(S.x_L, (case.x0 - np.float32(S.eps)))
            np.testing.assert_array_equal(S.x_U, (case.x0 + np.float32(S.eps)))
        else:
            assert S.x_L is None and S.x_U is None
        for m, (lb, ub) in S.methods.items():
            assert lb.shape == ub.shape == case.y0.shape, (sname, m)
            assert np.all(np.isfinite(lb)) and np.all(np.isfinite(ub)), (sname, m)
            assert np.all(lb <= ub), (sname, m)
        # interm bounds only where final bounds exist
        assert set(S.interm) <= set(S.methods)


def test_empirical_inside_every_bound(case):
    """The README says every stored bound contains the sampled and PGD extrema."""
    for sname, S in case.sets.items():
        assert S.sample_min is not None and S.sample_max is not None
        assert S.sample_min.shape == case.y0.shape
        assert np.all(S.sample_min <= S.sample_max)
        emp = [("sample_min", S.sample_min), ("sample_max", S.sample_max)]
        if S.pgd_min is not None:
            assert S.pgd_min.shape == S.pgd_max.shape == case.y0.shape
            emp += [("pgd_min", S.pgd_min), ("pgd_max", S.pgd_max)]
        else:
            assert case.is_perf  # only perf cases lack PGD
        for m, (lb, ub) in S.methods.items():
            for what, v in emp:
                assert np.all(lb <= v) and np.all(v <= ub), (sname, m, what, (lb - v).max(), (v - ub).max())
            # the clean output is a point of the set too
            tol = 1e-5 * _scale(case.y0)
            assert np.all(lb - tol <= case.y0) and np.all(case.y0 <= ub + tol), (sname, m)


def test_our_points_inside_every_bound(case):
    """fn at random points of the set (as we read eps / norm) lies in every stored bound."""
    B = case.x0.shape[0]
    with jax.default_matmul_precision("highest"):
        f = jax.jit(case.fn)
        for sname, S in case.sets.items():
            pts = _points(case, S, N_POINTS)
            y = np.asarray(f(jnp.asarray(pts))).reshape(N_POINTS, B, -1)
            if case.C is not None:  # spec rows: C @ f(x) per batch element
                y = np.einsum("bro,nbo->nbr", case.C, y)
            ymin, ymax = y.min(0), y.max(0)
            for m, (lb, ub) in S.methods.items():
                tol = 1e-5 * _scale(lb, ub)
                assert np.all(lb - tol <= ymin), (sname, m, (lb - ymin).max())
                assert np.all(ymax <= ub + tol), (sname, m, (ymax - ub).max())


def test_interm_nodes_map_to_inputs(case):
    ops = {n["id"]: n["op"] for n in case.nodes}
    ids = [n["id"] for n in case.nodes]
    for n in case.nodes:
        for i in n.get("inputs", []):
            assert ids.index(i) < ids.index(n["id"]), "nodes not in evaluation order"
    for S in case.sets.values():
        for m, d in S.interm.items():
            for node in d:
                assert node in case.interm_inputs, (m, node)
                assert ops[node] in oracle.NONLINEAR_OPS, (node, ops[node])


def test_interm_bounds_contain_activations(case):
    """interm/<node> bounds the INPUT of <node>: check at x0 and at random points of the set."""
    if not any(S.interm for S in case.sets.values()):
        pytest.skip("no intermediate bounds stored for this case")
    B = case.x0.shape[0]
    with jax.default_matmul_precision("highest"):
        fwd = jax.jit(case.activations)
        for sname, S in case.sets.items():
            if not S.interm:
                continue
            pts = np.concatenate([case.x0, _points(case, S, N_POINTS, seed=1)])
            acts = fwd(jnp.asarray(pts))
            for m, d in S.interm.items():
                for node, (lb, ub) in d.items():
                    v = np.asarray(acts[case.interm_inputs[node]])
                    v = v.reshape((N_POINTS + 1, B) + v.shape[1:])
                    assert v.shape[1:] == lb.shape == ub.shape, (sname, m, node, v.shape, lb.shape)
                    assert np.all(lb <= ub), (sname, m, node)
                    tol = 1e-5 * _scale(v)
                    assert np.all(lb[None] - tol <= v), (sname, m, node, (lb[None] - v).max())
                    assert np.all(v <= ub[None] + tol), (sname, m, node, (v - ub[None]).max())
