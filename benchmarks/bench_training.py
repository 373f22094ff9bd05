"""Certified-training step time: CROWN-IBP on margins versus loss fusion, 10 and 200 classes.

Not a test: run it by hand, never from CI.

    python benchmarks/bench_training.py                            # batch 128, 10 and 200 classes
    python benchmarks/bench_training.py --classes 10 --steps clean,ibp,fused --repeats 5

One jitted optimiser step (Adam) of a CIFAR-size CNN (conv 16 4x4/2, conv 32 4x4/2,
dense 100, dense ``classes``; input 32x32x3) per row: ``clean`` (plain cross-entropy,
the baseline every ratio is against, measured in the same run), ``ibp``, ``crown-ibp``
(robust CE on CROWN-IBP margin bounds: ``classes - 1`` spec rows) and ``fused`` (loss
fusion with CROWN-IBP: one bounded scalar per example), all at eps = 8/255 with
``beta = 1`` so the CROWN-IBP pass runs. Compilation (lower + XLA compile) is timed
apart; the step time is the median (and min) of ``--repeats`` calls (fewer once
``--budget-s`` is spent) after one warm-up call, each with ``jax.block_until_ready``.
The same steps run through auto_LiRPA when torch and auto_LiRPA import; otherwise the
comparison is reported as skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from jaxlirpa import training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from certified_training import CNN  # noqa: E402  (the example's model, here at CIFAR size)

EPS = 8 / 255
STEPS = ("clean", "ibp", "crown-ibp", "fused")


def clean_step(state: TrainState, x, labels):
    def loss(params):
        logits = state.apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), {"loss": value}


def time_calls(call, repeats: int, budget_s: float) -> list[float]:
    """Seconds of ``repeats`` calls after a warm-up call; fewer (at least one) once
    ``budget_s`` is spent."""
    jax.block_until_ready(call())
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def bench_jax(name: str, classes: int, batch: int, repeats: int, budget_s: float) -> dict:
    key = jax.random.key(0)
    x = jax.random.uniform(key, (batch, 32, 32, 3))
    labels = jnp.arange(batch) % classes
    model = CNN(classes)
    state = TrainState.create(apply_fn=model.apply, params=model.init(key, x[:1])["params"], tx=optax.adam(1e-3))
    step = jax.jit(clean_step) if name == "clean" else training.make_train_step(name, eps=EPS, beta=1.0)
    start = time.perf_counter()
    lowered = step.lower(state, x, labels)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(state, x, labels), repeats, budget_s)
    return dict(trace_s=trace_s, compile_s=compile_s, median=statistics.median(times), min=min(times), n=len(times))


def bench_auto_lirpa(name: str, classes: int, batch: int, repeats: int, budget_s: float) -> float:
    """auto_LiRPA's same step (median seconds), as in its examples/vision/simple_training.py."""
    import torch
    from auto_LiRPA import BoundedModule, BoundedTensor, CrossEntropyWrapper
    from auto_LiRPA.bound_ops import BoundExp
    from auto_LiRPA.perturbations import PerturbationLpNorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 4, 2, 1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(2048, 100), torch.nn.ReLU(), torch.nn.Linear(100, classes))
    x = torch.rand(batch, 3, 32, 32)
    labels = torch.arange(batch) % classes
    ptb = PerturbationLpNorm(norm=np.inf, eps=EPS, x_L=(x - EPS).clamp(0, 1), x_U=(x + EPS).clamp(0, 1))
    opts = {"relu": "adaptive", "loss_fusion": name == "fused"}
    if name == "fused":
        model = BoundedModule(CrossEntropyWrapper(net), (x[:1], labels[:1]), bound_opts=opts)
    else:
        model = BoundedModule(net, x[:1], bound_opts=opts)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    eye = torch.eye(classes)[labels]
    spec = eye.unsqueeze(1) - torch.eye(classes).unsqueeze(0)  # (batch, classes, classes): row y is 0
    spec = spec[(torch.arange(classes).unsqueeze(0) != labels.unsqueeze(1))].view(batch, classes - 1, classes)

    def step():
        optimizer.zero_grad()
        if name == "clean":
            loss = torch.nn.functional.cross_entropy(net(x), labels)
        elif name == "fused":
            _, ub = model(method_opt="compute_bounds", x=(BoundedTensor(x, ptb), labels), C=None,
                          method="CROWN-IBP", bound_lower=False)
            exp_node = next(m for m in model._modules.values() if isinstance(m, BoundExp))
            loss = torch.mean(torch.log(ub) + exp_node.max_input)
        else:
            method = "IBP" if name == "ibp" else "CROWN-IBP"
            lb, _ = model(method_opt="compute_bounds", x=(BoundedTensor(x, ptb),), C=spec, method=method,
                          bound_upper=False)
            zeros = torch.zeros(batch, 1)
            loss = torch.nn.functional.cross_entropy(torch.cat([zeros, -lb], 1), torch.zeros(batch, dtype=torch.long))
        loss.backward()
        optimizer.step()

    return statistics.median(time_calls(step, repeats, budget_s))


def auto_lirpa_available() -> str | None:
    """None when torch and auto_LiRPA import, else why not."""
    try:
        import auto_LiRPA  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="10,200", help="comma-separated class counts (default: 10,200)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call (default: 3)")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="stop timing a step after this many seconds, with at least one call (default: 60)")
    args = p.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    steps = args.steps.split(",")
    unknown = set(steps) - set(STEPS)
    if unknown or "clean" not in steps:
        raise SystemExit(f"--steps must include clean (the baseline) and name only {STEPS}; got {steps}")

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), batch {args.batch}, "
          f"eps 8/255; median of n steps after a warm-up; ratio = step / clean step of the same run; "
          f"load average {os.getloadavg()[0]:.1f}")
    skipped = auto_lirpa_available()
    if skipped:
        print(f"auto_LiRPA comparison skipped: {skipped}")
    else:
        import torch
        torch.set_num_threads(os.cpu_count())
    header = (f"{'step':<10} {'classes':>7} {'trace s':>8} {'compile s':>9} {'median ms':>10} {'min ms':>8} {'n':>3} "
              f"{'ratio':>7}")
    print(header + ("" if skipped else f" {'aL ms':>9} {'t/t_aL':>7}"))
    print("-" * len(header))
    results = {}
    for k in classes:
        for name in steps:
            r = bench_jax(name, k, args.batch, args.repeats, args.budget_s)
            results[name, k] = r
            line = (f"{name:<10} {k:>7} {r['trace_s']:>8.2f} {r['compile_s']:>9.2f} {r['median'] * 1e3:>10.1f} "
                    f"{r['min'] * 1e3:>8.1f} {r['n']:>3} {r['median'] / results['clean', k]['median']:>7.1f}")
            if not skipped:
                try:
                    t_al = bench_auto_lirpa(name, k, args.batch, args.repeats, args.budget_s)
                    line += f" {t_al * 1e3:>9.1f} {r['median'] / t_al:>7.2f}"
                except Exception as e:  # a version mismatch must not hide jaxlirpa's own numbers
                    line += f"  auto_LiRPA failed: {type(e).__name__}: {e}"
            print(line, flush=True)
    for name in ("crown-ibp", "fused"):
        if len(classes) > 1 and all((name, k) in results for k in classes):
            lo, hi = min(classes), max(classes)
            growth = results[name, hi]["median"] / results[name, lo]["median"]
            print(f"{name}: {hi} classes cost {growth:.2f}x its {lo}-class step")


if __name__ == "__main__":
    main()
