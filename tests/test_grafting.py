"""Linearity grafting (jaxlirpa.grafting): each step at tiny size, and the soundness
and exactness of bounds through grafted activations."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlirpa
from jaxlirpa import grafting
from jaxlirpa.api import trace_per_example
from jaxlirpa.grafting.activation import INTERCEPT, SLOPE
from jaxlirpa.methods.context import Context
from jaxlirpa.methods.crown import crown_intervals
from jaxlirpa.testing import assert_sound

LINEAR_METHODS = ["crown", "crown-ibp", "forward", "alpha-crown"]
ALPHA = jaxlirpa.AlphaOptions(iterations=3)


class MLP(nn.Module):
    hidden: int = 6

    @nn.compact
    def __call__(self, x):
        x = grafting.GraftedReLU(name="relu1")(nn.Dense(self.hidden, name="dense1")(x))
        return nn.Dense(3, name="dense2")(x)


TINY_CONV = grafting.ConvStack(convs=((2, 3, 2, 1),), dense=(5, 3))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4)))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), variables["params"])
    return model, {**variables, "params": params}


@pytest.fixture(scope="module")
def conv():
    x = jax.random.uniform(jax.random.key(2), (3, 6, 6, 1), minval=0.2, maxval=0.8)
    variables = jax.jit(TINY_CONV.init)(jax.random.key(3), x)
    masks = grafting.get_masks(variables)
    half = {k: (jax.random.uniform(jax.random.key(4), m.shape) < 0.5).astype(m.dtype) for k, m in masks.items()}
    return TINY_CONV, grafting.with_masks(variables, half), x


def _half_mask(variables):
    return grafting.with_masks(variables, {"relu1": jnp.array([1.0, 0, 1, 0, 1, 0])})


def _bounds(fn, x, eps, method, **kw):
    return jaxlirpa.bound(fn, x, eps, method=method, alpha=ALPHA if method == "alpha-crown" else None, **kw)


# ------------------------------------------------------------------ activation


def test_grafted_relu_is_relu_or_line_per_neuron(mlp):
    model, variables = mlp
    assert float(variables["params"]["relu1"][SLOPE][0]) != 0.4  # perturbed by the fixture
    fresh = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    np.testing.assert_allclose(fresh["params"]["relu1"][SLOPE], 0.4)
    np.testing.assert_allclose(fresh["params"]["relu1"][INTERCEPT], 0.0)
    assert not np.any(grafting.get_masks(fresh)["relu1"])
    x = jnp.linspace(-2, 2, 24).reshape(4, 6)
    act = grafting.GraftedReLU()
    v = act.init(jax.random.key(0), x)
    v = {"params": {SLOPE: jnp.full(6, 0.3), INTERCEPT: jnp.full(6, -0.1)},
         "grafting": {"mask": jnp.array([1.0, 0, 1, 0, 1, 0])}}
    y = act.apply(v, x)
    m = v["grafting"]["mask"] > 0
    np.testing.assert_allclose(y[:, m], 0.3 * x[:, m] - 0.1, rtol=1e-6)
    np.testing.assert_allclose(y[:, ~m], jax.nn.relu(x[:, ~m]))


def test_masks_are_validated(mlp):
    _, variables = mlp
    with pytest.raises(ValueError, match="shape"):
        grafting.with_masks(variables, {"relu1": jnp.ones(5)})
    with pytest.raises(ValueError, match="0 and 1"):
        grafting.with_masks(variables, {"relu1": jnp.full(6, 0.5)})
    with pytest.raises(ValueError, match="no GraftedReLU"):
        grafting.with_masks(variables, {"relu9": jnp.ones(6)})
    with pytest.raises(ValueError, match="grafting"):
        grafting.get_masks({"params": variables["params"]})


# ------------------------------------------------------------- exact bounds


def _reference(variables, mask):
    """The grafted MLP with no ReLU at all on grafted neurons (kept neurons gathered)."""
    p = variables["params"]
    keep, lin = np.flatnonzero(mask == 0), np.flatnonzero(mask == 1)
    w1, b1, w2, b2 = p["dense1"]["kernel"], p["dense1"]["bias"], p["dense2"]["kernel"], p["dense2"]["bias"]
    a, b = p["relu1"][SLOPE], p["relu1"][INTERCEPT]

    def fn(x):
        h = x @ w1 + b1
        return jax.nn.relu(h[:, keep]) @ w2[keep] + (a[lin] * h[:, lin] + b[lin]) @ w2[lin] + b2

    return fn


@pytest.mark.parametrize("method", ["ibp", *LINEAR_METHODS])
def test_grafted_neurons_add_no_relaxation(mlp, method):
    """Bounds of the grafted net equal those of the same net written without a ReLU on
    the grafted neurons: their masked ReLU branch contributes nothing."""
    model, variables = mlp
    variables = _half_mask(variables)
    x = jax.random.normal(jax.random.key(5), (3, 4))
    got = _bounds(lambda z: model.apply(variables, z), x, 0.3, method)
    want = _bounds(_reference(variables, np.asarray(grafting.get_masks(variables)["relu1"])), x, 0.3, method)
    np.testing.assert_allclose(got.lower, want.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.upper, want.upper, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_all_linear_graft_gives_the_exact_range(mlp, method):
    model, variables = mlp
    variables = grafting.with_masks(variables, {"relu1": jnp.ones(6)})
    fn = lambda z: model.apply(variables, z)  # noqa: E731
    x, eps = jax.random.normal(jax.random.key(6), (2, 4)), 0.2
    jac = jax.vmap(jax.jacobian(lambda xi: fn(xi[None])[0]))(x)  # (2, 3, 4), constant: fn is affine
    radius = jnp.sum(jnp.abs(jac), axis=-1) * eps
    b = _bounds(fn, x, eps, method)
    np.testing.assert_allclose(b.lower, fn(x) - radius, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.upper, fn(x) + radius, rtol=1e-5, atol=1e-5)
    ibp = _bounds(fn, x, eps, "ibp")
    assert np.all(ibp.lower <= b.lower + 1e-5) and np.all(ibp.upper >= b.upper - 1e-5)


def test_grafted_neurons_are_stable_relus_in_the_traced_graph(conv):
    """The ReLU that any bound method (and a branch and bound over its neurons) sees
    has input bounds exactly [0, 0] at grafted neurons: never unstable, never split."""
    model, variables, x = conv
    masks = grafting.get_masks(variables)
    graph, consts, _ = trace_per_example(lambda z: model.apply(variables, z), x)

    @jax.jit
    def relu_input_bounds(consts, x0):
        ctx = Context(graph, consts, [x0], {graph.perturbed_inputs[0]: jaxlirpa.LinfBall(0.5).region(x0)})
        bounds = crown_intervals(ctx)
        return [bounds[e.inputs[0]] for e in ctx.perturbed_eqns if e.prim.name == "max"]

    found = relu_input_bounds(consts, x[0])
    assert len(found) == len(masks)
    for interval, mask in zip(found, masks.values()):
        grafted = np.asarray(mask) > 0
        lower, upper = (np.asarray(b).reshape(mask.shape) for b in interval)  # traced with a batch of 1
        assert np.all(lower[grafted] == 0) and np.all(upper[grafted] == 0)
        assert np.any(lower[~grafted] < 0)  # the kept ones are really bounded


@pytest.mark.parametrize("method", ["ibp", "crown", "forward"])
def test_bounds_of_a_grafted_conv_net_are_sound(conv, method):
    model, variables, x = conv
    assert_sound(lambda z: model.apply(variables, z), x, jaxlirpa.LinfBall(0.1, 0.0, 1.0), method=method,
                 n_samples=64, attack_steps=10)


# ------------------------------------------------------------------ scores


def test_preactivation_bounds_contain_preactivations_and_scores_skip_grafted(conv):
    model, variables, x = conv
    ball = jaxlirpa.LinfBall(0.1, 0.0, 1.0)
    bounds = grafting.preactivation_bounds(model, variables, x, ball, method="crown")
    assert list(bounds) == ["relu1", "relu2"]
    points = jaxlirpa.testing.sample_points(ball, x, jax.random.key(7), 32)  # (32, *x.shape)
    for k, h in grafting.preactivations(model, variables, points.reshape(-1, *x.shape[1:])).items():
        h = h.reshape(32, *bounds[k].lower.shape)
        assert np.all(h >= bounds[k].lower - 1e-5) and np.all(h <= bounds[k].upper + 1e-5)
    masks = grafting.get_masks(variables)
    ibp_r_u = grafting.unstable_scores(model, variables, x, ball, method="ibp", batch_size=None)
    crown_r_u = grafting.unstable_scores(model, variables, x, ball, method="crown", batch_size=None)
    for k, r in ibp_r_u.items():
        assert r.shape == masks[k].shape and np.all((r >= 0) & (r <= 1))
        assert np.all(r[masks[k] > 0] == 0)
        unstable = (bounds[k].lower < 0) & (bounds[k].upper > 0) & (masks[k] == 0)
        np.testing.assert_allclose(crown_r_u[k], jnp.mean(unstable, axis=0))
        assert np.all(crown_r_u[k] <= r + 1e-6)  # CROWN is tighter than IBP: fewer unstable


@pytest.mark.parametrize("kind", ["activation", "gradient"])
def test_significance_scores_are_normalised_means(conv, kind):
    model, variables, x = conv
    y = jnp.array([0, 1, 2])
    r_s = grafting.significance_scores(model, variables, x, y, kind=kind, batch_size=2)
    assert max(float(r.max()) for r in r_s.values()) == pytest.approx(1.0)
    assert all(np.all(r >= 0) for r in r_s.values())
    if kind == "activation":
        raw = {k: jnp.mean(jnp.abs(a), axis=0) for k, a in grafting.activations(model, variables, x).items()}
    else:  # the gradient w.r.t. the activations by hand: a model whose activation takes an offset
        offsets = {k: jnp.zeros_like(a) for k, a in grafting.activations(model, variables, x).items()}
        pert = {k: {"activation": v} for k, v in offsets.items()}
        loss = lambda o: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({**variables, "perturbations": o}, x), y))
        grads = jax.grad(loss)(pert)
        raw = {k: jnp.mean(jnp.abs(grads[k]["activation"]), axis=0) for k in offsets}
    top = max(float(r.max()) for r in raw.values())
    for k in raw:
        np.testing.assert_allclose(r_s[k], raw[k] / top, rtol=1e-5, atol=1e-7)


def test_significance_scores_errors(conv):
    model, variables, x = conv
    with pytest.raises(ValueError, match="labels"):
        grafting.significance_scores(model, variables, x, kind="gradient")
    with pytest.raises(ValueError, match="kind"):
        grafting.significance_scores(model, variables, x, kind="taylor")


# ---------------------------------------------------------------- selection


def test_select_neurons_takes_the_global_top_fraction():
    priority = {"a": jnp.array([[0.0, 5.0], [1.0, -2.0]]), "b": jnp.array([3.0, 4.0, -1.0, 2.0])}
    masks = grafting.select_neurons(priority, 0.5)
    np.testing.assert_array_equal(masks["a"], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(masks["b"], [1, 1, 0, 1])
    jitted = jax.jit(lambda p: grafting.select_neurons(p, 0.5))(priority)
    np.testing.assert_array_equal(jitted["b"], masks["b"])
    # Already grafted neurons stay grafted and count towards the fraction.
    current = {"a": jnp.array([[0.0, 0.0], [0.0, 1.0]]), "b": jnp.zeros(4)}
    more = grafting.select_neurons(priority, 0.25, current=current)
    np.testing.assert_array_equal(more["a"], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(more["b"], [0, 0, 0, 0])
    assert sum(int(m.sum()) for m in grafting.select_neurons(priority, 0.0, current=current).values()) == 1
    with pytest.raises(ValueError, match="fraction"):
        grafting.select_neurons(priority, 1.5)


def test_priorities_and_gamma_schedule():
    r_u = {"a": jnp.array([1.0, 0.0, 0.5])}
    r_s = {"a": jnp.array([0.2, 0.0, 1.0])}
    np.testing.assert_allclose(grafting.grafting_priority(r_u, r_s, 2.0)["a"], [1.8, 0.0, 0.0])
    np.testing.assert_allclose(grafting.grafting_priority(r_u, r_s, 0.0)["a"], [-0.2, 0.0, -1.0])  # magnitude only
    with pytest.raises(ValueError, match="layers"):
        grafting.grafting_priority(r_u, {"b": r_s["a"]}, 1.0)
    assert grafting.gamma_schedule(3) == [2.0, 1.0, 0.0] and grafting.gamma_schedule(1) == [2.0]
    with pytest.raises(ValueError):
        grafting.gamma_schedule(0)
    rand = grafting.random_priority(jax.random.key(0), {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
    assert rand["a"].shape == (2, 3) and rand["b"].shape == (4,)
    masks = grafting.select_neurons(rand, 0.5)
    assert sum(int(m.sum()) for m in masks.values()) == 5


# ----------------------------------------------------------------- training


def test_grad_align_penalty_vanishes_for_a_linear_model():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    x, y = jax.random.uniform(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    linear_logits = lambda z: z @ w  # noqa: E731  its input gradient moves only through the softmax
    relu_logits = lambda z: jax.nn.relu(z - 0.5) @ w  # noqa: E731
    penalty = grafting.grad_align_penalty(linear_logits, x, y, 1e-4, jax.random.key(2))
    assert float(penalty) == pytest.approx(0, abs=1e-4)
    assert float(grafting.grad_align_penalty(relu_logits, x, y, 0.5, jax.random.key(2))) > 0


def test_fat_loss_without_grad_align_is_the_fgsm_loss():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    fn = lambda z: z @ w  # noqa: E731
    x, y = jax.random.uniform(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
    key = jax.random.key(3)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(fn(z), y)  # noqa: E731
    want = jnp.mean(ce(jaxlirpa.attacks.fgsm(ce, x, 0.1, key=jax.random.split(key)[0], lower=0.0, upper=1.0)))
    assert float(grafting.fat_loss(fn, x, y, 0.1, key, grad_align=0.0)) == pytest.approx(float(want), rel=1e-6)
    assert float(grafting.fat_loss(fn, x, y, 0.1, key)) >= float(want) - 1e-6


def test_fat_train_lowers_the_loss_and_keeps_the_masks(conv):
    model, variables, x = conv
    xs = jnp.tile(x, (6, 1, 1, 1))
    ys = jnp.tile(jnp.array([0, 1, 2]), 6)
    losses = []
    trained = grafting.fat_train(model, variables, xs, ys, 0.05, optimizer=optax.adam(1e-2), epochs=8,
                                 batch_size=6, log=lambda e, loss: losses.append(loss))
    assert losses[-1] < losses[0]
    for k, m in grafting.get_masks(trained).items():
        np.testing.assert_array_equal(m, grafting.get_masks(variables)[k])
    with pytest.raises(ValueError, match="batch"):
        grafting.fat_train(model, variables, xs, ys, 0.05, optimizer=optax.sgd(0.1), epochs=1, batch_size=100)


def test_finetune_optimizer_has_two_groups(mlp):
    _, variables = mlp
    params = variables["params"]
    opt = grafting.finetune_optimizer(10)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(ones, opt.init(params), params)
    np.testing.assert_allclose(updates["relu1"][SLOPE], -0.01)  # lr 0.01, no weight decay
    np.testing.assert_allclose(updates["relu1"][INTERCEPT], -0.01)
    w = params["dense1"]["kernel"]
    np.testing.assert_allclose(updates["dense1"]["kernel"], -0.001 * (1 + 5e-4 * w), rtol=1e-6)


def test_graft_then_finetune(conv):
    model, variables, x = conv
    plain = grafting.with_masks(variables, jax.tree.map(jnp.zeros_like, grafting.get_masks(variables)))
    xs, ys = jnp.tile(x, (4, 1, 1, 1)), jnp.tile(jnp.array([0, 1, 2]), 4)
    ball = jaxlirpa.LinfBall(0.1, 0.0, 1.0)
    messages = []
    out = grafting.graft(model, plain, xs, ys, ball, 0.5, rounds=2, score_examples=6, score_method="ibp",
                         finetune_epochs=0, batch_size=4, progress=messages.append)  # fine-tuning: tested above
    masks = grafting.get_masks(out)
    total = sum(m.size for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)
    first = f"{round(0.25 * total) / total:.1%} of the neurons grafted"
    assert "gamma 2" in messages[0] and first in messages[0] and "gamma 0" in messages[1]


# ------------------------------------------------------------------- models


@pytest.mark.parametrize("model, shape, neurons, fan_in", [
    (grafting.CNNA(), (1, 28, 28, 1), 4804, 1568),
    (grafting.ConvBig(), (1, 28, 28, 1), 48064, 3136),
    (grafting.ConvBig(), (1, 32, 32, 3), 62464, 4096),
    (grafting.ConvHuge(), (1, 32, 32, 3), 731520, 230400),
    (grafting.CNNB(), (1, 32, 32, 3), 16634, 8192),
    (grafting.ResNet4B(), (1, 32, 32, 3), 14436, 512),
])
def test_model_shapes(model, shape, neurons, fan_in):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    masks = grafting.get_masks(variables)
    assert sum(int(np.prod(m.shape)) for m in masks.values()) == neurons
    assert variables["params"]["dense1"]["kernel"].shape[0] == fan_in
    out = jax.eval_shape(lambda v, z: model.apply(v, z), variables, jnp.zeros(shape))
    assert out.shape == (1, 10)


# ------------------------------------------------------------------ report


def test_incomplete_verifier_statuses(mlp):
    model, variables = mlp
    fn = lambda z: model.apply(variables, z)  # noqa: E731
    x = jnp.array([0.5, 0.2, 0.7, 0.1])
    label = int(jnp.argmax(fn(x[None])[0]))
    verify = grafting.incomplete_verifier(("ibp", "crown"))
    assert verify(fn, x, (label + 1) % 3, 0.01)[0] == "sat"
    status, seconds = verify(fn, x, label, 1e-6)
    assert status == "unsat" and seconds >= 0
    assert verify(fn, x, label, 1.0)[0] == "unknown"
    with pytest.raises(ValueError):
        grafting.incomplete_verifier(())


@pytest.mark.skipif(not hasattr(jaxlirpa, "verify"), reason="jaxlirpa.verify (branch and bound) not available yet")
def test_complete_verifier(mlp):
    model, variables = mlp
    fn = lambda z: model.apply(variables, z)  # noqa: E731
    x = jnp.array([0.5, 0.2, 0.7, 0.1])
    label = int(jnp.argmax(fn(x[None])[0]))
    status, seconds = grafting.complete_verifier(10.0)(fn, x, label, 1e-6)
    assert status == "unsat" and seconds >= 0


def test_report_table_and_figures(conv, tmp_path):
    pytest.importorskip("matplotlib")
    model, variables, x = conv
    plain = grafting.with_masks(variables, jax.tree.map(jnp.zeros_like, grafting.get_masks(variables)))
    y = jnp.argmax(model.apply(variables, x), -1)
    r = grafting.report({"plain": (model, plain), "grafted": (model, variables)}, x, y, 0.05, bound_method="ibp",
                        verifier=grafting.incomplete_verifier("ibp"), n_verify=2, pgd_steps=3, batch_size=2)
    plain_row, grafted_row = r.rows
    assert grafted_row.standard_accuracy == 1.0 and grafted_row.robust_accuracy <= 1.0
    assert 0 < grafted_row.grafted_fraction < 1 and plain_row.grafted_fraction == 0
    assert grafted_row.unstable_ratio <= 1 - grafted_row.grafted_fraction
    assert len(grafted_row.statuses) == 2 and grafted_row.margin_lower_bounds.shape == (2,)
    assert grafted_row.verified_accuracy == np.mean(grafted_row.margin_lower_bounds > 0)  # the same IBP bounds
    table = r.table().splitlines()
    assert table[0].startswith("| model | grafted | UNR | VA | SA | RA (PGD-3)") and len(table) == 4
    r.plot_unstable_neurons(tmp_path / "fig3.png")
    r.plot_lower_bounds(tmp_path / "fig4.png")
    assert (tmp_path / "fig3.png").stat().st_size > 0 and (tmp_path / "fig4.png").stat().st_size > 0
    with pytest.raises(ValueError, match="n_verify"):
        grafting.report({"plain": (model, plain)}, x, y, 0.05, verifier=grafting.incomplete_verifier("ibp"),
                        n_verify=10)
