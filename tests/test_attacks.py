import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlirpa.attacks import fgsm, fgsm_loss, margin_objective, pgd, pgd_loss, project

B, D = 6, 5
TOL = 1e-5


def _data(seed=0, shape=(B, D)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k1, shape, minval=0.2, maxval=0.8)
    w = jax.random.normal(k2, shape[1:])
    return x, w


def _linear(w):
    return lambda z: jnp.sum(z * w, axis=tuple(range(1, z.ndim)))


def _l2(v):
    return np.sqrt(np.sum(np.square(v), axis=tuple(range(1, v.ndim))))


def _assert_in_linf(z, x, eps, lower=None, upper=None):
    z, x = np.asarray(z), np.asarray(x)
    assert np.all(np.abs(z - x) <= np.asarray(eps) + TOL)
    if lower is not None:
        assert np.all(z >= np.asarray(lower) - TOL) and np.all(z <= np.asarray(upper) + TOL)


def _assert_in_l2(z, x, eps, lower=None, upper=None):
    z, x = np.asarray(z), np.asarray(x)
    assert np.all(_l2(z - x) <= np.broadcast_to(np.asarray(eps), (x.shape[0],)) + TOL)
    if lower is not None:
        assert np.all(z >= lower - TOL) and np.all(z <= upper + TOL)


LINF_EPS = [0.1, jnp.linspace(0.05, 0.3, D), jnp.linspace(0.05, 0.3, B)[:, None]]


@pytest.mark.parametrize("eps", LINF_EPS, ids=["scalar", "per_feature", "per_example"])
@pytest.mark.parametrize("domain", [False, True])
def test_project_linf_inside_set(eps, domain):
    x, _ = _data()
    z = x + 3.0 * jax.random.normal(jax.random.key(1), x.shape)
    bounds = dict(lower=0.0, upper=1.0) if domain else {}
    p = project(z, x, eps, norm=np.inf, **bounds)
    _assert_in_linf(p, x, eps, bounds.get("lower"), bounds.get("upper"))
    inside = project(p, x, eps, norm="inf", **bounds)
    np.testing.assert_allclose(inside, p, atol=TOL)  # idempotent


@pytest.mark.parametrize("eps", [0.3, jnp.linspace(0.05, 0.5, B)], ids=["scalar", "per_example"])
@pytest.mark.parametrize("domain", [False, True])
def test_project_l2_inside_set(eps, domain):
    x, _ = _data(shape=(B, 2, 3))
    z = x + 3.0 * jax.random.normal(jax.random.key(1), x.shape)
    bounds = dict(lower=0.0, upper=1.0) if domain else {}
    p = project(z, x, eps, norm=2, **bounds)
    _assert_in_l2(p, x, eps, bounds.get("lower"), bounds.get("upper"))
    np.testing.assert_allclose(project(p, x, eps, norm=2, **bounds), p, atol=TOL)
    if not domain:  # far points land on the sphere, along the same direction
        np.testing.assert_allclose(_l2(p - x), np.broadcast_to(eps, (B,)), rtol=1e-5)
        cos = np.sum((p - x) * (z - x), axis=(1, 2)) / (_l2(p - x) * _l2(z - x))
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_bad_norm_and_objective_shape_raise():
    x, w = _data()
    with pytest.raises(ValueError, match="norm"):
        project(x, x, 0.1, norm=1)
    with pytest.raises(ValueError, match="one value per example"):
        pgd(lambda z: jnp.sum(z), x, 0.1)


@pytest.mark.parametrize("eps", LINF_EPS, ids=["scalar", "per_feature", "per_example"])
def test_pgd_linf_linear_optimum(eps):
    x, w = _data()
    x_adv = pgd(_linear(w), x, eps, steps=10)
    np.testing.assert_allclose(x_adv, x + eps * jnp.sign(w), atol=TOL)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_l2_linear_optimum(random_start):
    x, w = _data(shape=(B, 2, 3))
    eps = jnp.linspace(0.1, 0.4, B)
    # from x the default steps reach the optimum exactly; from a random start
    # the off-axis part shrinks geometrically, fast with steps of size eps
    kw = dict(steps=30, step_size=eps) if random_start else {}
    x_adv = pgd(_linear(w), x, eps, norm=2, random_start=random_start, **kw)
    expected = x + eps[:, None, None] * w / jnp.linalg.norm(w)
    np.testing.assert_allclose(_linear(w)(x_adv), _linear(w)(expected), rtol=1e-5)
    # near the optimum the value is flat to second order, so float32 ties
    # between late iterates pin the point only to about sqrt(machine eps)
    np.testing.assert_allclose(x_adv, expected, atol=1e-3 if random_start else TOL)


def _mlp(seed=3, hidden=16, classes=3):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w1 = jax.random.normal(k1, (D, hidden)) * 2.0
    b1 = jax.random.normal(k2, (hidden,))
    w2 = jax.random.normal(k3, (hidden, classes))
    return lambda z: jnp.tanh(z @ w1 + b1) @ w2


@pytest.mark.parametrize("norm,eps,step_size", [("inf", 0.1, None), (2, 0.25, 0.1)])
def test_pgd_beats_clean_and_random_points(norm, eps, step_size):
    x, _ = _data()
    net = _mlp()
    labels = jnp.argmax(net(x), axis=-1)
    objective = margin_objective(net, labels)
    x_adv = pgd(objective, x, eps, norm=norm, steps=20, step_size=step_size, restarts=2,
                lower=0.0, upper=1.0)
    check = _assert_in_linf if norm == "inf" else _assert_in_l2
    check(x_adv, x, eps, 0.0, 1.0)
    best = objective(x_adv)
    assert np.all(best >= objective(x))

    @jax.jit
    def best_random(key, n=256):  # best of n random points of the same set
        xs = jnp.repeat(x, n, axis=0)
        noise = jax.random.uniform(key, xs.shape, minval=-1.0, maxval=1.0)
        if norm == 2:
            noise = noise / jnp.linalg.norm(noise, axis=1, keepdims=True)
        rand = project(xs + eps * noise, xs, eps, norm=norm, lower=0.0, upper=1.0)
        return margin_objective(net, jnp.repeat(labels, n))(rand).reshape(B, n).max(axis=1)

    assert np.all(best >= best_random(jax.random.key(7)) - 1e-6)


def test_pgd_under_jit_matches_eager():
    x, _ = _data()
    net = _mlp()
    labels = jnp.argmax(net(x), axis=-1)
    kw = dict(steps=5, restarts=2, lower=0.0, upper=1.0)

    @jax.jit
    def attack(x, labels, eps, key):
        return pgd_loss(net, x, labels, eps, key=key, **kw)

    key = jax.random.key(4)
    x_jit = attack(x, labels, 0.1, key)
    np.testing.assert_allclose(x_jit, pgd_loss(net, x, labels, 0.1, key=key, **kw), atol=1e-6)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(net(z), labels)
    assert np.all(ce(x_jit) >= ce(x)) and np.any(ce(x_jit) > ce(x) + 1e-3)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), (2, jnp.linspace(0.1, 0.3, 4))])
def test_pgd_batched_examples_are_independent(norm, eps):
    """Image-shaped batch: attacking together equals attacking one by one."""
    k1, k2 = jax.random.split(jax.random.key(5))
    x = jax.random.uniform(k1, (4, 2, 3, 3))
    w = jax.random.normal(k2, (18, 3))
    net = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ w)
    labels = jnp.array([0, 1, 2, 0])
    attack = jax.jit(lambda x, y, eps: pgd_loss(
        net, x, y, eps, norm=norm, steps=6, random_start=False, lower=0.0, upper=1.0))
    together = attack(x, labels, eps)
    eps_i = jnp.broadcast_to(eps, (4,))
    alone = jnp.concatenate([attack(x[i:i + 1], labels[i:i + 1], eps_i[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # float32 sums of another order


def test_restarts_keep_best():
    """Two bumps: from x, ascent climbs the small near one; random restarts
    reach the big far one, and the best over restarts is kept."""
    x = jnp.zeros((4, 1))

    def objective(z):
        z = z[:, 0]
        return jnp.exp(-(((z - 0.5) / 0.2) ** 2)) + 2.0 * jnp.exp(-(((z + 0.9) / 0.2) ** 2))

    kw = dict(steps=40, step_size=0.05)
    single = objective(pgd(objective, x, 1.0, random_start=False, **kw))
    multi = objective(pgd(objective, x, 1.0, restarts=16, key=jax.random.key(2), **kw))
    assert np.all(single > 0.95) and np.all(single < 1.05)
    assert np.all(multi > 1.9)


def test_fgsm_stays_in_box_and_ascends():
    x, w = _data()
    eps = jnp.linspace(0.05, 0.3, D)
    x_adv = fgsm(_linear(w), x, eps, lower=0.0, upper=1.0, key=jax.random.key(3))
    _assert_in_linf(x_adv, x, eps, 0.0, 1.0)
    x_adv = fgsm(_linear(w), x, eps, key=jax.random.key(3))
    # every coordinate ends at least (alpha - eps) = 0.25 eps along sign(w)
    assert np.all((x_adv - x) * jnp.sign(w) >= 0.25 * eps - TOL)
    classic = fgsm(_linear(w), x, eps, random_start=False)
    np.testing.assert_allclose(classic, x + eps * jnp.sign(w), atol=TOL)


def test_l2_fgsm_stays_in_ball_and_reaches_the_maximiser():
    x, w = _data()
    x_adv = fgsm(_linear(w), x, 0.5, norm=2, key=jax.random.key(3))
    assert np.all(_l2(x_adv - x) <= 0.5 + TOL)
    # from the centre, one normalised step of alpha >= eps lands on the linear maximiser
    classic = fgsm(_linear(w), x, 0.5, norm=2, random_start=False)
    np.testing.assert_allclose(classic, x + 0.5 * w / _l2(w[None]), atol=TOL)


def test_fgsm_loss_raises_the_cross_entropy():
    x, _ = _data()
    W = jax.random.normal(jax.random.key(5), (D, 3))
    model, y = (lambda z: z.reshape(z.shape[0], -1) @ W), jnp.zeros(x.shape[0], jnp.int32)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(model(z), y)
    x_adv = fgsm_loss(model, x, y, 0.1, random_start=False)
    _assert_in_linf(x_adv, x, 0.1, None, None)
    assert np.all(ce(x_adv) > ce(x))


def test_margin_objective_finds_counterexample_iff_eps_large():
    x, _ = _data()
    k1, k2 = jax.random.split(jax.random.key(6))
    W = jax.random.normal(k1, (D, 2))
    b = jax.random.normal(k2, (2,)) * 0.1
    net = lambda z: z @ W + b
    labels = jnp.argmax(net(x), axis=-1)
    objective = margin_objective(net, labels)
    margin = objective(x)
    assert np.all(margin < 0)
    # linear 2-class model: the L-inf distance to the decision boundary is exact
    dist = -margin / jnp.sum(jnp.abs(W[:, 0] - W[:, 1]))
    attack = jax.jit(lambda eps: objective(pgd(objective, x, eps[:, None])))
    found, missed = attack(2.0 * dist), attack(0.5 * dist)
    assert np.all(found > 0)
    assert np.all(missed < 0)
