"""The paper's evaluation of grafted networks: a table and two figures.

For each model: UNR (the fraction of all ReLU neurons that are unstable, averaged
over the verified instances; grafted neurons are linear, never unstable), VA
(verified accuracy: the verifier proves robustness), SA (clean accuracy), RA
(accuracy under PGD-100), and the mean verification time per instance. The
figures are the paper's Figure 3 (unstable neurons per layer, per model) and
Figure 4 (per-instance lower bounds of the worst margin, sorted).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlirpa
from jaxlirpa.attacks import pgd_loss
from jaxlirpa.grafting.activation import get_masks
from jaxlirpa.grafting.scores import unstable_neurons
from jaxlirpa.grafting.verifiers import Verifier


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """One model's row of the report, with the per-instance data behind it.

    Example: ``[row.statuses.count("timeout") for row in report(models, x, y, 0.1, verifier=v).rows]``.
    """

    name: str
    grafted_fraction: float
    unstable_ratio: float
    verified_accuracy: float
    standard_accuracy: float
    robust_accuracy: float
    mean_verification_seconds: float
    statuses: tuple[str, ...]
    seconds: np.ndarray
    unstable_per_layer: dict[str, float]
    """Mean number of unstable neurons per instance, per layer (in call order)."""
    margin_lower_bounds: np.ndarray
    """Per instance, the lower bound of ``min_j logit_y - logit_j`` (positive: verified)."""


@dataclasses.dataclass(frozen=True)
class GraftingReport:
    """The rows of :func:`report`, as a markdown table and as figures.

    Example: ``r = report(models, x, y, 0.1, verifier=v); print(r.table()); r.plot_lower_bounds("fig4.png")``.
    """

    rows: tuple[ModelReport, ...]
    eps: float
    pgd_steps: int
    bound_method: str

    def table(self) -> str:
        """The report as a markdown table (percentages; time in seconds)."""
        head = (f"| model | grafted | UNR | VA | SA | RA (PGD-{self.pgd_steps}) | avg. verification time (s) "
                f"| timeouts |\n|---|---|---|---|---|---|---|---|")
        lines = [f"| {r.name} | {r.grafted_fraction:.0%} | {r.unstable_ratio:.2%} | {r.verified_accuracy:.1%} "
                 f"| {r.standard_accuracy:.1%} | {r.robust_accuracy:.1%} | {r.mean_verification_seconds:.3f} "
                 f"| {r.statuses.count('timeout')}/{len(r.statuses)} |" for r in self.rows]
        return "\n".join([head, *lines])

    def plot_unstable_neurons(self, path) -> None:
        """Figure 3: mean unstable neurons per instance in each layer, one bar per model."""
        from matplotlib.figure import Figure

        layers = list(self.rows[0].unstable_per_layer)
        fig = Figure(figsize=(max(6.0, 1.2 * len(layers) * len(self.rows) / 2), 4.0), layout="constrained")
        ax = fig.add_subplot()
        width = 0.8 / len(self.rows)
        for k, r in enumerate(self.rows):
            ax.bar(np.arange(len(layers)) + (k - (len(self.rows) - 1) / 2) * width,
                   [r.unstable_per_layer[layer] for layer in layers], width, label=r.name)
        ax.set_xticks(np.arange(len(layers)), layers)
        ax.set_xlabel("activation layer")
        ax.set_ylabel(f"unstable neurons per instance ({self.bound_method})")
        ax.set_title(f"Unstable ReLU neurons, L-inf eps = {self.eps:g}")
        ax.legend()
        fig.savefig(path)

    def plot_lower_bounds(self, path) -> None:
        """Figure 4: each model's per-instance margin lower bounds, sorted; above 0 is verified."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        for r in self.rows:
            ax.plot(np.sort(r.margin_lower_bounds)[::-1], label=r.name)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("instance (sorted)")
        ax.set_ylabel(f"{self.bound_method} lower bound of the worst margin")
        ax.set_title(f"Verified lower bounds, L-inf eps = {self.eps:g}")
        ax.legend()
        fig.savefig(path)


def _clean_and_attacked_accuracy(model, variables, x, y, eps, pgd_steps, lower, upper, key, chunk=250):
    """Accuracy on ``x`` and under a PGD attack of ``pgd_steps`` steps, ``chunk`` images at a time."""
    predict = jax.jit(lambda v, z: jnp.argmax(model.apply(v, z), -1))
    attack = jax.jit(lambda v, xb, yb, k: pgd_loss(lambda z: model.apply(v, z), xb, yb, eps, steps=pgd_steps,
                                                   lower=lower, upper=upper, key=k))
    clean = attacked = 0
    for i in range(0, len(x), chunk):
        xb, yb = jnp.asarray(x[i:i + chunk]), jnp.asarray(y[i:i + chunk])
        clean += int(jnp.sum(predict(variables, xb) == yb))
        attacked += int(jnp.sum(predict(variables, attack(variables, xb, yb, jax.random.fold_in(key, i))) == yb))
    return clean / len(x), attacked / len(x)


def report(models: Mapping[str, tuple[nn.Module, dict]], x, y, eps: float, *, verifier: Verifier,
           n_verify: int = 100, pgd_steps: int = 100, bound_method: str = "crown", lower: float = 0.0,
           upper: float = 1.0, batch_size: int = 10, key=None,
           progress: Callable[[str], None] | None = None) -> GraftingReport:
    """Evaluate each ``(model, variables)`` of ``models`` as the paper's Table 1 does.

    **Arguments:**
    - ``x``, ``y``: test images and labels; SA and RA use all of them, the
      verifier, UNR and the lower bounds the first ``n_verify``.
    - ``eps``: L-inf radius, the ball clipped to ``[lower, upper]``.
    - ``verifier``: ``verifier(fn, x, label, eps) -> (status, seconds)`` (see
      :mod:`jaxlirpa.grafting.verifiers`); it runs once untimed first (compilation).
    - ``pgd_steps``: steps of the PGD attack behind RA.
    - ``bound_method``: the method of the pre-activation bounds (UNR) and the margin lower bounds.
    - ``batch_size``: examples bounded at a time.

    Example::

        r = report({"FAT": (model, fat), "grafted 50%": (model, grafted)}, x_test, y_test, 0.1,
                   verifier=incomplete_verifier(("crown", "alpha-crown")))
        print(r.table()); r.plot_unstable_neurons("fig3.png"); r.plot_lower_bounds("fig4.png")
    """
    if n_verify < 1 or n_verify > len(x):
        raise ValueError(f"n_verify must lie in [1, {len(x)}], got {n_verify}.")
    key = jax.random.key(0) if key is None else key
    ball = jaxlirpa.LinfBall(eps, lower=lower, upper=upper)
    xv, yv = jnp.asarray(x[:n_verify]), jnp.asarray(y[:n_verify])
    say = progress or (lambda _: None)
    rows = []
    for name, (model, variables) in models.items():
        sa, ra = _clean_and_attacked_accuracy(model, variables, x, y, eps, pgd_steps, lower, upper, key)
        say(f"{name}: SA {sa:.1%}, RA {ra:.1%}")
        # Bounded and verified as a plain closure: its weights are the constants of the traced program.
        fn = lambda z, m=model, v=variables: m.apply(v, z)  # noqa: E731
        unstable = unstable_neurons(model, variables, xv, ball, method=bound_method, batch_size=batch_size)
        neurons = sum(int(np.prod(u.shape[1:])) for u in unstable.values())
        per_layer = {k: float(jnp.mean(jnp.sum(u.reshape(n_verify, -1), axis=1))) for k, u in unstable.items()}
        num_classes = jax.eval_shape(fn, xv[:1]).shape[-1]
        margins = jaxlirpa.bound(fn, xv, ball, method=bound_method, spec=jaxlirpa.margin_spec(yv, num_classes),
                                 batch_size=batch_size).lower
        verifier(fn, xv[0], int(yv[0]), eps)  # compile outside the timed runs
        results = [verifier(fn, xv[i], int(yv[i]), eps) for i in range(n_verify)]
        statuses = tuple(s for s, _ in results)
        seconds = np.array([t for _, t in results])
        masks = get_masks(variables)
        rows.append(ModelReport(
            name=name,
            grafted_fraction=sum(float(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values()),
            unstable_ratio=sum(per_layer.values()) / neurons,
            verified_accuracy=statuses.count("unsat") / n_verify,
            standard_accuracy=sa, robust_accuracy=ra,
            mean_verification_seconds=float(seconds.mean()),
            statuses=statuses, seconds=seconds, unstable_per_layer=per_layer,
            margin_lower_bounds=np.asarray(jnp.min(margins, axis=1))))
        say(f"{name}: UNR {rows[-1].unstable_ratio:.2%}, VA {rows[-1].verified_accuracy:.1%}, "
            f"{rows[-1].mean_verification_seconds:.3f} s per instance")
    return GraftingReport(tuple(rows), float(eps), pgd_steps, bound_method)


__all__ = ["GraftingReport", "ModelReport", "report"]
