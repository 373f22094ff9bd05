"""Complete verification: beta-CROWN soundness under random splits, verdicts on the shared
VNN-COMP test networks and a few ACAS Xu instances, the command line, bad input."""
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlirpa
from jaxlirpa import cli
from jaxlirpa.bab import robustness_property, verify
from jaxlirpa.bab.bounding import SCORE_FLOOR, Bounder, cached, combined_rows
from jaxlirpa.bab import input_split as input_split_module
from jaxlirpa.bab.input_split import _halve
from jaxlirpa.bab.report import Outcome
from jaxlirpa.bab.problem import Problem
from jaxlirpa.bab.relu_split import _children, _root, splittable_vars

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "vnncomp"
RNG = np.random.default_rng(0)
WEIGHTS = [(RNG.normal(size=(2, 12)).astype(np.float32), RNG.normal(size=12).astype(np.float32) * 0.5),
           (RNG.normal(size=(12, 12)).astype(np.float32) / 3, RNG.normal(size=12).astype(np.float32) * 0.5),
           (RNG.normal(size=(12, 3)).astype(np.float32) / 3, np.zeros(3, np.float32))]


def mlp(x, pre=None, activation=jax.nn.relu):
    """A 2-12-12-3 network (ReLU by default); ``pre`` collects its pre-activations."""
    for k, (W, b) in enumerate(WEIGHTS):
        x = x @ W + b
        if k < len(WEIGHTS) - 1:
            if pre is not None:
                pre.append(x)
            x = activation(x)
    return x


# Every rule with a kink at 0 that branch and bound may split: ReLU, leaky ReLU, abs.
ACTIVATIONS = {"relu": jax.nn.relu, "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.1), "abs": jnp.abs}


def _problem(activation):
    prop = robustness_property(np.zeros(2, np.float32), 0, 1.0, 3, lower=None, upper=None)
    return Problem.from_disjuncts(lambda x: mlp(x, activation=activation), (2,), prop.lower, prop.upper,
                                  prop.disjuncts)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("iterations", [0, 5])
def test_beta_crown_is_sound_under_random_splits(iterations, activation):
    activation = ACTIVATIONS[activation]
    problem = _problem(activation)
    bounder = Bounder(problem)
    consts, A, C, d = bounder.args
    lo, hi = jnp.asarray(problem.lower), jnp.asarray(problem.upper)
    _, alphas, root_bounds = cached(problem.graph, _root, static_argnames=("iterations",))(
        consts, A, d, lo, hi, iterations=5)
    variables = splittable_vars(problem.graph, consts, lo, hi)
    assert len(variables) == 2
    n, shape = 16, problem.graph.avals[variables[0]].shape  # (1, 12): the traced example keeps its batch axis
    splits = {v: np.zeros((n, 12), np.int8) for v in variables}
    for k in range(n):  # three random neurons per domain, each on a random side
        for neuron in RNG.choice(24, size=3, replace=False):
            splits[variables[neuron // 12]][k, neuron % 12] = RNG.choice([-1, 1])
    splits = {v: s.reshape(n, *shape) for v, s in splits.items()}
    betas = {v: RNG.exponential(size=(n, A.shape[0], *shape)).astype(np.float32) for v in variables}
    alphas = jax.tree_util.tree_map(lambda a: RNG.uniform(size=(n, *a.shape)).astype(np.float32), alphas)
    expand = cached(problem.graph, _children, static_argnames=("iterations",))
    bound, _, _, _ = expand(consts, A, d, lo, hi, root_bounds, splits, alphas, betas, iterations=iterations)
    # Sample the box, keep the points inside each domain's split region, and attack the
    # margin there: no point of a domain may fall below its bound.
    x = jnp.asarray(RNG.uniform(-1, 1, size=(40000, 2)).astype(np.float32))
    pre = []
    y = mlp(x, pre, activation)
    margins = np.asarray(jnp.min(y[:, :1] - y[:, 1:], axis=1))
    checked = 0
    for k in range(n):
        inside = np.ones(len(x), bool)
        for v, z in zip(variables, pre):
            inside &= np.all((np.asarray(z) * splits[v][k].reshape(-1)) >= 0, axis=1)
        if inside.any():
            checked += 1
            assert margins[inside].min() >= float(bound[k]) - 1e-4, k
    assert checked >= n // 2


def test_sub_boxes_bounded_from_their_parent_are_sound():
    """Children bounded from their parent's intermediate bounds (CROWN redone for only
    ``rows`` unstable neurons per layer) still contain every sampled margin; each box's
    candidate counterexample lies in it and carries the network's margin there."""
    prop = robustness_property(np.zeros(2, np.float32), 2, 1.0, 3, lower=None, upper=None)  # class 2: most of the box
    problem = Problem.from_disjuncts(mlp, (2,), prop.lower, prop.upper, prop.disjuncts)
    bounder = Bounder(problem)
    lo = RNG.uniform(-1, 0.8, size=(16, 2)).astype(np.float32)
    hi = lo + 0.2
    reference = bounder.box_bounds(lo, hi)[4]
    child_lo, child_hi = _halve(lo, hi, RNG.integers(0, 2, size=16))
    child_ref = jax.tree_util.tree_map(lambda a: np.concatenate([a, a]), reference)
    x = child_lo[:, None] + RNG.uniform(size=(32, 500, 2)).astype(np.float32) * (child_hi - child_lo)[:, None]
    y = np.asarray(mlp(jnp.asarray(x.reshape(-1, 2)))).reshape(32, 500, 3)
    margin_of = lambda y: np.min(np.max(np.einsum("kro,...o->...kr", problem.C, y) - problem.d, axis=-1), axis=-1)
    lowest = margin_of(y).min(axis=1)
    for rows, iterations in ((3, 0), (12, 0), (3, 5)):  # with steps, the best rows and the last lines differ
        bound, _, point, margin, _, _ = bounder.box_bounds(child_lo, child_hi, child_ref, iterations, rows=rows)
        assert np.all(np.asarray(bound) <= lowest + 1e-4), rows
        point = np.asarray(point)
        assert np.all((child_lo <= point) & (point <= child_hi))
        np.testing.assert_allclose(margin, margin_of(np.asarray(mlp(jnp.asarray(point)))), rtol=1e-5, atol=1e-5)
    assert np.any(np.asarray(bound) > 0)  # not vacuous: some children are proved


def test_split_score_floors_every_input_coefficient():
    """An input with coefficient 0 in the decisive line still scores SCORE_FLOOR of the
    largest coefficient, times its width: its width may loosen intermediate bounds, and
    unscored it would never be halved (ACAS Xu 1_1/prop_5 timed out that way)."""
    fn = lambda x: jnp.concatenate([3 * x[..., :1], jnp.zeros_like(x[..., :1])], axis=-1)  # margin 3 x0
    prop = robustness_property(np.zeros(2, np.float32), 0, 1.0, 2, lower=None, upper=None)
    bounder = Bounder(Problem.from_disjuncts(fn, (2,), prop.lower, prop.upper, prop.disjuncts))
    bound, score = bounder.box_bounds(prop.lower[None], prop.upper[None])[:2]
    np.testing.assert_allclose(bound, [-3.0], rtol=1e-5)
    np.testing.assert_allclose(score, [[6.0, SCORE_FLOOR * 6.0]], rtol=1e-5)


def test_combined_rows_are_sound_and_beat_every_single_row():
    """A convex combination of a conjunction's rows bounds the box where no single row
    does (x + 0.1 and 0.1 - x on [-1, 1]: their mean is 0.1), never above the max
    of the rows at any point of the box, and never below the best row's own bound."""
    lo, hi = jnp.array([-1.0]), jnp.array([1.0])
    rows = jnp.array([-0.9, -0.9])
    bound, _ = combined_rows(jnp.array([[1.0], [-1.0]]), rows, rows, lo, hi, jnp.array([True, True]))
    assert abs(float(bound) - 0.1) < 1e-3
    combine = jax.jit(combined_rows)  # one shape, one compilation; the masks vary the row count
    for trial in range(20):
        rows, n = 4, 5
        a = RNG.normal(size=(rows, n)).astype(np.float32)
        b = RNG.normal(size=rows).astype(np.float32)
        lo = RNG.uniform(-1, 0, size=n).astype(np.float32)
        hi = lo + RNG.uniform(0.1, 1, size=n).astype(np.float32)
        value = b + np.minimum(a * lo, a * hi).sum(axis=1)
        valid = RNG.uniform(size=rows) < 0.8
        valid[RNG.integers(rows)] = True
        a_in = np.where(valid[:, None], a, np.nan)  # padded rows may hold anything
        value = jnp.asarray(np.where(valid, value, -np.inf))
        bound, _ = combine(jnp.asarray(a_in), value, value,
                                 jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(valid))
        x = lo + RNG.uniform(size=(4000, n)).astype(np.float32) * (hi - lo)
        corners = np.where(RNG.integers(0, 2, size=(64, n)) > 0, lo, hi)
        best_row = np.max(np.where(valid, np.concatenate([x, corners]) @ a.T + b, -np.inf), axis=1)
        assert float(bound) >= value[valid].max() - 1e-5, trial
        assert float(bound) <= best_row.min() + 1e-5, trial


def test_portfolio_interleaves_searches_and_outlives_an_unknown_one(monkeypatch):
    """The searches step in turn by their shares of the time; one that ends "unknown"
    (out of memory, say) leaves the others running, and the deciding one is named."""
    steps = []

    def fake_search(problem, bounder, refresh, *rest):
        name = "prover" if refresh else "quitter"
        for k in range({"quitter": 2, "prover": 8}[name]):
            steps.append(name)
            time.sleep(0.02)  # every step takes about the same time
            yield k, -1.0
        return Outcome("unknown" if name == "quitter" else "unsat", domains=10)

    monkeypatch.setattr(input_split_module, "_search", fake_search)
    monkeypatch.setattr(input_split_module, "PORTFOLIO", (("quitter", False, 1), ("prover", True, 3)))
    outcome = input_split_module.input_split(None, None, deadline=float("inf"))
    assert (outcome.status, outcome.search) == ("unsat", "prover")
    second_turn = [k for k, s in enumerate(steps) if s == "quitter"][1]
    assert 2 <= steps[:second_turn].count("prover") <= 5  # about three steps of the prover per one of the quitter
    assert steps.count("prover") == 8
    assert outcome.domains == 20  # the quitter's boxes count too


def test_shared_test_networks_get_the_right_verdicts():
    expected = {"test_nano": "unsat", "test_tiny": "unsat", "test_small": "unsat", "test_sat": "sat",
                "test_unsat": "unsat"}
    for model, prop in [("test_nano", "test_nano"), ("test_tiny", "test_tiny"), ("test_small", "test_small"),
                        ("test_sat", "test_prop"), ("test_unsat", "test_prop")]:
        verdict = cli.run_instance(SHARED / "test" / f"{model}.onnx", SHARED / "test" / f"{prop}.vnnlib", 60)
        assert verdict.status == expected[model], model
        if verdict.status == "sat":
            x, y = verdict.counterexample
            fn, shape = jaxlirpa.onnx.load(SHARED / "test" / f"{model}.onnx")
            np.testing.assert_allclose(np.asarray(fn(x.reshape(shape))).reshape(-1), y, rtol=1e-5)


# Quick instances with both answers; the whole benchmark is benchmarks/vnncomp.py's job.
ACAS = [("ACASXU_run2a_1_9_batch_2000.onnx", "prop_1.vnnlib", "unsat"),
        ("ACASXU_run2a_2_6_batch_2000.onnx", "prop_2.vnnlib", "sat"),
        ("ACASXU_run2a_3_6_batch_2000.onnx", "prop_4.vnnlib", "unsat"),
        ("ACASXU_run2a_4_7_batch_2000.onnx", "prop_3.vnnlib", "unsat")]


@pytest.mark.parametrize("model,prop,truth", ACAS)
def test_acas_xu_subset(model, prop, truth):
    verdict = cli.run_instance(SHARED / "acasxu" / model, SHARED / "acasxu" / prop, 100)
    assert verdict.status == truth


def test_relu_split_proves_and_refutes_robustness():
    x = np.array([0.3, -0.2], np.float32)
    label = int(np.argmax(mlp(x[None])[0]))
    small = verify(mlp, robustness_property(x, label, 0.01, 3, lower=None, upper=None), branching="relu",
                   timeout=60)
    assert small.status == "unsat"
    large = verify(mlp, robustness_property(x, label, 2.0, 3, lower=None, upper=None), branching="relu",
                   timeout=60)
    assert large.status == "sat"
    cex, y = large.counterexample
    assert np.max(np.abs(cex - x)) <= 2.0 + 1e-6 and np.argmax(y) != label


def test_fused_activations_verify_by_input_split():
    """Fused primitives (leaky ReLU, gelu) run under vmap in branch and bound."""
    fn = lambda x: mlp(x, activation=lambda z: jax.nn.gelu(jax.nn.leaky_relu(z, 0.1)))
    x = np.array([0.3, -0.2], np.float32)
    label = int(np.argmax(fn(x[None])[0]))
    verdict = verify(fn, robustness_property(x, label, 0.05, 3, lower=None, upper=None), timeout=60)
    assert verdict.status == "unsat"


def test_command_line_writes_the_result_file(tmp_path, capsys):
    out = tmp_path / "result.txt"
    code = cli.main(["verify", str(SHARED / "test" / "test_sat.onnx"), str(SHARED / "test" / "test_prop.vnnlib"),
                     "--timeout", "60", "--out", str(out), "--quiet", "--no-cache"])
    assert code == 0 and capsys.readouterr().out.strip() == "sat"
    text = out.read_text()
    assert text.startswith("sat\n((X_0 ") and "(Y_0 " in text


def test_bad_files_and_arguments_give_clear_errors(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    code = cli.main(["verify", str(bad), str(SHARED / "test" / "test_prop.vnnlib"), "--no-cache"])
    assert code == 2 and "broken.onnx" in capsys.readouterr().err
    wrong = tmp_path / "wrong.vnnlib"
    wrong.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)\n")
    code = cli.main(["verify", str(SHARED / "test" / "test_nano.onnx"), str(wrong), "--no-cache"])
    assert code == 2 and "wrong.vnnlib" in capsys.readouterr().err
    prop = robustness_property(np.zeros(2, np.float32), 0, 0.1, 3)
    with pytest.raises(ValueError, match="branching"):
        verify(mlp, prop, branching="sideways")
    with pytest.raises(ValueError, match="timeout"):
        verify(mlp, prop, timeout=0)
    with pytest.raises(ValueError, match="inputs"):
        verify(mlp, prop, input_shape=(3,))
