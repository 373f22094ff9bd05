"""Jitted certified-training and evaluation steps on a flax ``TrainState``, optionally
data parallel over a device mesh, and a training loop with progress bars.

The model is called as ``state.apply_fn({"params": params}, x)`` (flax's
convention for ``TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)``)
and must return logits ``(batch, classes)``; it must not update other variable
collections (batch-norm statistics of the batch are not per-example, so they
cannot be bounded per example).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlirpa.api import _check_method, verified
from jaxlirpa.attacks import margin_objective, pgd
from jaxlirpa.sets import LinfBall
from jaxlirpa.training.losses import check_weight, crown_ibp_loss, fused_loss, ibp_loss

__all__ = ["LOSSES", "TrainStep", "batch_mesh", "make_train_step", "make_eval_step", "evaluate", "train_epoch"]

LOSSES = {
    "ibp": lambda apply, x, y, ball, beta: ibp_loss(apply, x, y, ball),
    "crown-ibp": crown_ibp_loss,
    "fused": fused_loss,
}
"""The certified losses :func:`make_train_step` accepts, by name."""


def _as_schedule(name: str, value, check) -> Callable:
    if callable(value):
        return value
    value = check(name, value)
    return lambda step: value


def _check_eps(name: str, value):
    value = jnp.asarray(value, jnp.float32)
    if not isinstance(value, jax.core.Tracer) and not (np.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (or an optax schedule), got {float(value)}.")
    return value


def batch_mesh(devices=None) -> Mesh:
    """A one-axis mesh ``("batch",)`` over ``devices`` (default: all), for data parallelism.

    Example: ``step = make_train_step("crown-ibp", eps=0.1, mesh=batch_mesh())``.
    """
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("batch",))


def _data_parallel(fn: Callable, mesh: Mesh | None, batched: tuple[bool, ...]) -> Callable:
    """``jax.jit(fn)``; with a mesh, the positional arguments flagged in ``batched`` split
    over the mesh's first axis and the others (the state, a key) replicated: each
    device bounds its share of the examples."""
    if mesh is None:
        return jax.jit(fn)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see batch_mesh()), got {type(mesh).__name__}.")
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return jax.jit(fn, in_shardings=tuple(split if b else replicated for b in batched), out_shardings=replicated)


def _check_divisible(mesh: Mesh | None, x) -> None:
    if mesh is not None and x.shape[0] % mesh.shape[mesh.axis_names[0]]:
        raise ValueError(f"the batch ({x.shape[0]}) must divide evenly over the {mesh.shape[mesh.axis_names[0]]} "
                         f"devices of mesh axis {mesh.axis_names[0]!r}.")


class TrainStep:
    """The callable :func:`make_train_step` returns: ``step(state, x, labels) -> (state, metrics)``.

    A step computes only what its schedule values need, in one of three programs
    without control flow: clean (``eps == 0``: the certified loss equals the clean
    one, so an eps warm-up costs plain training), certified without the CROWN-IBP
    pass (``beta == 0``) and certified with it. The program is picked on the host
    from a mirror of ``state.step``: read from the device once (the first call, or
    a state this step did not return, e.g. a restored one), then counted, so the
    loop never waits on the device. Why not ``lax.switch``: on XLA:CPU gradients of
    convolutions inside a conditional run 4-20x slower. Called on traced arguments
    (inside your own ``jax.jit``), it traces one ``lax.switch`` over the three.
    """

    def __init__(self, step_fn: Callable, phase_of: Callable, mesh: Mesh | None):
        self._step_fn, self._phase_of, self._mesh = step_fn, jax.jit(phase_of), mesh
        self._programs = [_data_parallel(functools.partial(step_fn, phase=p), mesh, batched=(False, True, True))
                          for p in range(3)]
        self._last_state, self._step = None, None

    def _program(self, state: TrainState, x):
        _check_divisible(self._mesh, x)
        if state is not self._last_state:
            self._step = int(state.step)
        return self._programs[int(self._phase_of(self._step))]

    def __call__(self, state: TrainState, x, labels):
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((state, x, labels))):
            return self._step_fn(state, x, labels, phase=None)
        new_state, metrics = self._program(state, x)(state, x, labels)
        self._last_state, self._step = new_state, self._step + 1
        return new_state, metrics

    def lower(self, state: TrainState, x, labels) -> jax.stages.Lowered:
        """The lowered program this call would run (``.compile()``, ``.cost_analysis()``, ...)."""
        return self._program(state, x).lower(state, x, labels)


def make_train_step(loss: str = "crown-ibp", *, eps, beta=1.0, kappa=0.0, lower=0.0, upper=1.0,
                    mesh: Mesh | None = None) -> TrainStep:
    """A jitted ``step(state, x, labels) -> (state, metrics)`` minimising
    ``kappa * CE(clean) + (1 - kappa) * certified loss`` over ``LinfBall(eps, lower, upper)``.

    ``eps``, ``beta`` and ``kappa`` are numbers or optax schedules of ``state.step``;
    a step skips the certified loss while ``eps == 0`` and the CROWN-IBP pass once
    ``beta == 0`` (see :class:`TrainStep`). ``metrics`` holds device scalars:
    ``loss``, ``clean_ce``, ``robust_ce``, ``accuracy`` (clean, on the batch), ``eps``, ``beta``.

    **Arguments:**
    - ``loss``: ``"ibp"`` (:func:`ibp_loss`), ``"crown-ibp"`` (:func:`crown_ibp_loss`)
      or ``"fused"`` (:func:`fused_loss`, loss fusion).
    - ``eps``: radius, or schedule, e.g. :func:`smoothed_schedule`.
    - ``beta``: CROWN-IBP's weight in ``[0, 1]`` (ignored by ``"ibp"``), e.g. :func:`crown_ibp_beta`.
    - ``kappa``: the clean cross-entropy's weight in ``[0, 1]``.
    - ``lower``, ``upper``: the input domain the ball is clipped to (``None``: none).
    - ``mesh``: shard the batch over this mesh's first axis (:func:`batch_mesh`); the
      batch size must divide by its number of devices. Results equal one device's.

    Example::

        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(5e-4))
        step = make_train_step("crown-ibp", eps=optax.linear_schedule(0.0, 0.1, 1000, 200))
        state, metrics = step(state, x, y)
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
    certified_loss = LOSSES[loss]
    eps_at = _as_schedule("eps", eps, _check_eps)
    beta_at, kappa_at = _as_schedule("beta", beta, check_weight), _as_schedule("kappa", kappa, check_weight)

    def schedule_values(step):
        return tuple(jnp.asarray(f(step), jnp.float32) for f in (eps_at, beta_at, kappa_at))

    def phase_of(step):
        eps, beta, _ = schedule_values(step)
        with_crown = (beta > 0) if loss != "ibp" else False
        return jnp.where(eps > 0, jnp.where(with_crown, 2, 1), 0)

    def step_fn(state: TrainState, x, labels, phase: int | None):
        eps, beta, kappa = schedule_values(state.step)
        ball = LinfBall(eps, lower=lower, upper=upper)

        def objective(params, certified_beta):
            apply = lambda z: state.apply_fn({"params": params}, z)  # noqa: E731
            logits = apply(x)
            clean = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            robust = clean if certified_beta is None else certified_loss(apply, x, labels, ball, certified_beta).mean()
            total = kappa * clean + (1 - kappa) * robust
            accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
            return total, dict(loss=total, clean_ce=clean, robust_ce=robust, accuracy=accuracy, eps=eps, beta=beta)

        # eps == 0: the certified loss is the clean one; beta == 0 (a Python 0): no CROWN-IBP pass
        branches = [functools.partial(jax.grad(objective, has_aux=True), certified_beta=b) for b in (None, 0.0, beta)]
        if phase is None:
            grads, metrics = lax.switch(phase_of(state.step), branches, state.params)
        else:
            grads, metrics = branches[phase](state.params)
        return state.apply_gradients(grads=grads), metrics

    return TrainStep(step_fn, phase_of, mesh)


def make_eval_step(eps, *, methods=("ibp", "crown"), lower=0.0, upper=1.0, pgd_steps: int = 20,
                   pgd_restarts: int = 1, batch_size: int | None = None, mesh: Mesh | None = None) -> Callable:
    """A jitted ``eval_step(state, x, labels, key) -> dict`` of per-example booleans:
    ``"clean"`` (correct), ``"pgd"`` (correct under an L-inf PGD attack on the margin),
    and one entry per bound method in ``methods``, ``True`` where the label provably
    holds over ``LinfBall(eps, lower, upper)``.

    ``batch_size`` goes to :func:`jaxlirpa.bound`: CROWN keeps a linear bound per
    hidden neuron per example, so bound a few examples at a time on large models.
    ``mesh`` shards the batch as in :func:`make_train_step`. See :func:`evaluate` for
    accuracies over a whole data set.

    Example::

        eval_step = make_eval_step(0.1, batch_size=16)
        flags = eval_step(state, x, y, jax.random.key(0))     # flags["crown"].mean(): verified accuracy
    """
    eps = _check_eps("eps", eps)
    methods = tuple(_check_method(m) for m in methods)
    if pgd_steps < 0 or pgd_restarts < 1:
        raise ValueError(f"need pgd_steps >= 0 and pgd_restarts >= 1, got {pgd_steps}, {pgd_restarts}.")

    def eval_step(state: TrainState, x, labels, key):
        apply = lambda z: state.apply_fn({"params": state.params}, z)  # noqa: E731
        wrong_by = margin_objective(apply, labels)  # > 0 where misclassified
        x_adv = pgd(wrong_by, x, eps, steps=pgd_steps, restarts=pgd_restarts, lower=lower, upper=upper, key=key)
        flags = {"clean": wrong_by(x) < 0, "pgd": wrong_by(x_adv) < 0}
        ball = LinfBall(eps, lower=lower, upper=upper)
        for m in methods:
            flags[m] = verified(apply, x, labels, ball, method=m, batch_size=batch_size)
        return flags

    jitted = _data_parallel(eval_step, mesh, batched=(False, True, True, False))

    def checked(state: TrainState, x, labels, key):
        _check_divisible(mesh, x)
        return jitted(state, x, labels, key)

    return checked


def evaluate(eval_step: Callable, state: TrainState, x, labels, *, batch_size: int = 128, key=None) -> dict:
    """Accuracies (fractions in ``[0, 1]``) of every flag of ``eval_step`` over a whole set,
    ``batch_size`` examples per call (fewer if the set is smaller); the last batch is
    padded to the same shape (one compilation) and the padding ignored.

    Example::

        acc = evaluate(make_eval_step(0.1), state, x_test, y_test)   # {"clean": .., "pgd": .., "crown": ..}
    """
    x, labels = np.asarray(x), np.asarray(labels)
    if len(x) == 0 or len(x) != len(labels):
        raise ValueError(f"need as many labels as images, and at least one; got {len(x)} and {len(labels)}.")
    key = jax.random.key(0) if key is None else key
    batch_size, totals = min(batch_size, len(x)), {}
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        index = np.arange(start, start + batch_size).clip(max=stop - 1)  # pad with the last example
        key, sub = jax.random.split(key)
        flags = eval_step(state, x[index], labels[index], sub)
        for name, flag in flags.items():
            totals[name] = totals.get(name, 0) + int(np.sum(np.asarray(flag)[: stop - start]))
    return {name: total / len(x) for name, total in totals.items()}


def _progress(iterable: Iterable, desc: str, total: int | None):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def train_epoch(train_step: Callable, state: TrainState, batches: Iterable, *, desc: str = "train",
                total: int | None = None, log: Callable[[str], None] | None = print) -> tuple[TrainState, dict]:
    """One pass of ``train_step`` over ``batches`` (pairs ``(x, labels)``), with a tqdm
    progress bar when tqdm is installed; returns the new state and the mean of each
    metric over the epoch, read from the device once, at the end. ``log`` (default
    ``print``; ``None`` for silence) gets one summary line.

    Example::

        for epoch in range(10):
            state, means = train_epoch(step, state, batches(x, y, 128, key=epoch), desc=f"epoch {epoch}")
    """
    start, history = time.perf_counter(), []
    for x, labels in _progress(batches, desc, total):
        state, metrics = train_step(state, x, labels)
        history.append(metrics)
    if not history:
        raise ValueError("batches yielded nothing; is the data set smaller than the batch size?")
    means = {k: float(v) for k, v in jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *history).items()}
    if log is not None:
        log(f"{desc}: " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" ({time.perf_counter() - start:.1f} s)")
    return state, means
