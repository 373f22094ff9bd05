"""Graph benchmark: IBP and CROWN through ``jaxlirpa.bound`` on a transformer and a ResNet.

Not a test: run it by hand, never from CI.

    python benchmarks/bench_graphs.py                          # both models, batch 1 and 8 (ResNet: 4), ibp + crown
    python benchmarks/bench_graphs.py --models transformer --depth 2 --methods ibp,crown-ibp,crown

Models, random weights with fixed seeds:

- ``transformer``: ``examples/transformer.py``'s ``Encoder.classify`` (pre-norm blocks of
  layer norm, 2-head softmax attention, gelu MLP; mean pooling, 2 classes), 8 tokens of
  width 16, ``--depth`` blocks (1), bounded over an L-inf ball of 0.005 around the embeddings;
- ``resnet4b``: ``jaxlirpa.grafting.models.ResNet4B`` (alpha-beta-CROWN's ``resnet4b``: a
  conv, four residual blocks, two dense layers, 14436 ReLUs) on 32x32x3 inputs in [0, 1],
  an L-inf ball of 2/255.

Conventions of ``bench_core.py``, whose helpers it reuses: every (model, method) runs in a
fresh subprocess; ``jax.jit(lambda params, x: jaxlirpa.bound(...))`` is lowered and compiled
with both times reported apart from the steady state (median and min of ``--repeats`` calls
after a warm-up call, each ``jax.block_until_ready``); a float32 matmul timed in the same
process gives the machine's practical rate. auto_LiRPA runs the same weights and input when
``torch`` and ``auto_LiRPA`` import; otherwise the script says so and prints absolute figures
(the stored oracle times are of other models).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_core as core  # noqa: E402  (shared timing helpers; imports no jax at module level)

# name -> (family, batch)
MODELS = {"transformer_b1": ("transformer", 1), "transformer_b8": ("transformer", 8),
          "resnet4b_b1": ("resnet4b", 1), "resnet4b_b4": ("resnet4b", 4)}
EPS = {"transformer": Fraction(5, 1000), "resnet4b": Fraction(2, 255)}
TOKENS, WIDTH, HEADS = 8, 16, 2


# ----------------------------------------------------------------------------------------
# child: one (model, method) in a fresh process
# ----------------------------------------------------------------------------------------


def build(cfg: dict):
    """``(apply, params, x)``: the flax model's apply, its random weights and a fixed input batch."""
    import jax
    import jax.numpy as jnp

    family, batch = MODELS[cfg["model"]]
    key_init, key_x = jax.random.split(jax.random.key(20240 + sum(map(ord, family))))
    if family == "transformer":
        sys.path.insert(0, str(REPO / "examples"))
        from transformer import VOCAB, Encoder

        model = Encoder(TOKENS, WIDTH, HEADS, cfg["depth"])
        tokens = jax.random.randint(key_x, (batch, TOKENS), 0, VOCAB)
        params = model.init(key_init, tokens)
        x = model.apply(params, tokens, method=Encoder.embed)
        return (lambda p, e: model.apply(p, e, method=Encoder.classify)), params, x
    from jaxlirpa.grafting.models import ResNet4B

    model = ResNet4B()
    x = jax.random.uniform(key_x, (batch, 32, 32, 3), jnp.float32)
    return model.apply, model.init(key_init, x[:1]), x


def child_jaxlirpa(cfg: dict) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    import jaxlirpa

    apply, params, x = build(cfg)
    eps = float(EPS[MODELS[cfg["model"]][0]])
    fn = jax.jit(lambda p, xx: jaxlirpa.bound(lambda z: apply(p, z), xx, eps, method=cfg["method"]))
    rec = {"eps": eps, "batch": int(x.shape[0])}
    rss0 = core._maxrss_mb()
    core._emit(phase="trace")
    t = time.perf_counter()
    lowered = fn.lower(params, x)
    rec["trace_s"] = time.perf_counter() - t
    core._emit(phase="compile")
    t = time.perf_counter()
    compiled = lowered.compile()
    rec["compile_s"] = time.perf_counter() - t
    rec["flops"], rec["xla_bytes"] = core._cost_flops(compiled), core._xla_bytes(compiled)
    core._emit(phase="run")
    rec.update(core._time_calls(lambda: jax.block_until_ready(compiled(params, x)), cfg["repeats"], cfg["budget_s"]))
    b = compiled(params, x)
    rec["mean_width"] = float(np.mean(np.asarray(b.upper) - np.asarray(b.lower)))
    rec["rss_mb"] = core._maxrss_mb() - rss0
    rec["matmul"] = core.child_matmul(cfg)
    rec["status"] = "ok"
    return rec


def torch_twin(cfg: dict, params):
    """The same network in PyTorch, weights copied from the flax ``params`` (NCHW input for the ResNet)."""
    import numpy as np
    import torch
    from torch import nn

    p = lambda a: nn.Parameter(torch.from_numpy(np.array(a, np.float32)))  # noqa: E731

    def dense(w):
        m = nn.Linear(*w["kernel"].shape)
        m.weight, m.bias = p(np.transpose(w["kernel"])), p(w["bias"])
        return m

    def conv(w, stride, pad):
        k = w["kernel"]
        m = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride=stride, padding=pad)
        m.weight, m.bias = p(np.transpose(k, (3, 2, 0, 1))), p(w["bias"])
        return m

    class LayerNorm(nn.Module):  # flax's formula written out, as auto_LiRPA's transformer examples do
        def __init__(self, w):
            super().__init__()
            self.scale, self.bias = p(w["scale"]), p(w["bias"])

        def forward(self, h):
            z = h - h.mean(-1, keepdim=True)
            return z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-6) * self.scale + self.bias

    class Transformer(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.ModuleDict({n: (LayerNorm if n.startswith("LayerNorm") else dense)(b[n]) for n in b})
                for b in (w[f"blocks_{i}"] for i in range(sum(k.startswith("blocks_") for k in w))))
            self.head = dense(w["head"])

        def forward(self, h):
            batch, length, dim = h.shape
            heads = lambda t: t.reshape(batch, length, HEADS, dim // HEADS).permute(0, 2, 1, 3)  # noqa: E731
            for m in self.blocks:
                z = m["LayerNorm_0"](h)
                q, k, v = heads(m["query"](z)), heads(m["key"](z)), heads(m["value"](z))
                attention = torch.softmax(q @ k.transpose(-1, -2) / float(np.sqrt(dim // HEADS)), -1)
                h = h + m["attention_out"]((attention @ v).permute(0, 2, 1, 3).reshape(batch, length, dim))
                z = m["Dense_0"](m["LayerNorm_1"](h))
                z = 0.5 * z * (1 + torch.tanh(float(np.sqrt(2 / np.pi)) * (z + 0.044715 * z * z * z)))  # flax's gelu
                h = h + m["Dense_1"](z)
            return self.head(h.mean(1))

    class ResNet(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.stem = conv(w["conv"], 2, 1)
            self.blocks = nn.ModuleList()
            for k, stride in enumerate((2, 1, 2, 1), 1):
                b = w[f"block{k}"]
                shortcut = conv(b["shortcut"], stride, 0) if "shortcut" in b else nn.Identity()
                self.blocks.append(nn.ModuleList([conv(b["conv1"], stride, 1), conv(b["conv2"], 1, 1), shortcut]))
            self.fc1, self.fc2 = dense(w["dense1"]), dense(w["dense2"])

        def forward(self, x):
            x = torch.relu(self.stem(x))
            for c1, c2, short in self.blocks:
                x = torch.relu(c2(torch.relu(c1(x))) + short(x))
            x = x.permute(0, 2, 3, 1).flatten(1)  # flax flattens NHWC
            return self.fc2(torch.relu(self.fc1(x)))

    family = MODELS[cfg["model"]][0]
    return (Transformer if family == "transformer" else ResNet)(params["params"]).eval()


def child_autolirpa(cfg: dict) -> dict:
    """auto_LiRPA on the same weights and input (only when it imports)."""
    import numpy as np
    import torch
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    _, params, x = build(cfg)
    x = np.asarray(x)
    if MODELS[cfg["model"]][0] == "resnet4b":
        x = np.transpose(x, (0, 3, 1, 2))  # NHWC -> NCHW
    x = torch.from_numpy(np.ascontiguousarray(x))
    eps = float(EPS[MODELS[cfg["model"]][0]])
    core._emit(phase="compile")
    t = time.perf_counter()
    model = BoundedModule(torch_twin(cfg, params), torch.empty_like(x))
    rec = {"batch": int(x.shape[0]), "build_s": time.perf_counter() - t}
    bx = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), x_L=x - eps, x_U=x + eps))
    core._emit(phase="run")
    method = core.AUTO_LIRPA_METHOD[cfg["method"]]
    with torch.no_grad():
        rec.update(core._time_calls(lambda: model.compute_bounds(x=(bx,), method=method), cfg["repeats"],
                                    cfg["budget_s"]))
        lower, upper = model.compute_bounds(x=(bx,), method=method)
    rec["mean_width"] = float((upper - lower).mean())
    rec["status"] = "ok"
    return rec


def child_main(cfg: dict) -> None:
    core._limit_threads(cfg["threads"])
    try:
        rec = {"jaxlirpa": child_jaxlirpa, "auto_LiRPA": child_autolirpa}[cfg["kind"]](cfg)
    except Exception as e:  # reported in the table, not raised
        rec = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    core._emit(phase="done", result=rec)


# ----------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------


def run_child(cfg: dict, timeout: float) -> dict:
    """One configuration in a fresh interpreter, killed after ``timeout`` seconds."""
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(cfg)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"killed: > {timeout:.0f} s", "wall_s": time.monotonic() - start}
    done = [json.loads(line[2:]) for line in proc.stdout.splitlines() if line.startswith("@@")]
    rec = next((m["result"] for m in done if m["phase"] == "done"), None)
    if rec is None:
        tail = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
        rec = {"status": f"crashed (rc {proc.returncode}): {tail[:160]}"}
    rec["wall_s"] = time.monotonic() - start
    return rec


COLUMNS = [("model", "<15"), ("method", "<9"), ("trace s", ">7"), ("compile s", ">9"), ("median ms", ">10"),
           ("min ms", ">9"), ("cpu ms", ">9"), ("GFLOP/s", ">7"), ("%mm", ">4"), ("XLA MB", ">6"), ("RSS MB", ">6"),
           ("width", ">9"), ("aL ms", ">9"), ("t/t_aL", ">6")]


def row_cells(r: dict) -> list[str]:
    j, a = r["jaxlirpa"], r.get("auto_LiRPA") or {}
    ok = j.get("status") == "ok"
    f = core._fmt
    ms = lambda key, rec=j: rec.get(key) and rec[key] * 1e3  # noqa: E731
    rate = j["flops"] / j["median_s"] / 1e9 if ok and j.get("flops") else None
    mm = (j.get("matmul") or {}).get("gflops")
    xb = j.get("xla_bytes")
    a_ok = a.get("status") == "ok"
    return [r["model"], r["method"], f(j.get("trace_s"), ".2f"), f(j.get("compile_s"), ".2f"),
            f(ms("median_s"), ".2f"), f(ms("min_s"), ".2f"), f(ms("median_cpu_s"), ".2f"), f(rate, ".1f"),
            f(rate and mm and 100 * rate / mm, ".0f"),
            f(xb and sum(xb[k] for k in ("argument", "output", "temp")) / 2**20, ".0f"), f(j.get("rss_mb"), ".0f"),
            f(j.get("mean_width"), ".4g"), f(ms("median_s", a) if a_ok else None, ".2f"),
            f(j["median_s"] / a["median_s"] if ok and a_ok else None, ".2f")]


def print_table(rows: list[dict], live: bool) -> None:
    head = "  ".join(format(c, s) for c, s in COLUMNS)
    print(head)
    print("-" * len(head))
    for r in rows:
        print("  ".join(format(c, s) for c, (_, s) in zip(row_cells(r), COLUMNS)))
        for side in ("jaxlirpa", "auto_LiRPA"):
            status = (r.get(side) or {}).get("status", "ok")
            if status != "ok":
                print(f"    ^ {side}: {status}")
    print("""
trace s   = jax tracing + lowering (jit(...).lower); compile s = XLA compile (lowered.compile()).
median/min ms = steady-state calls of the compiled bound (block_until_ready), after one warm-up call;
cpu ms    = median process CPU time per call (well below the wall time with 1 thread: the core was shared).
GFLOP/s   = XLA cost_analysis flops / median; %mm = that over a 2048^3 float32 matmul timed in the same process.
XLA MB    = compiled.memory_analysis() argument + output + temp; RSS MB = growth of peak RSS from tracing on.
width     = mean upper - lower of the logits.""")
    print("aL ms     = auto_LiRPA's median on the same weights and input; t/t_aL = median / aL ms (< 1: jaxlirpa faster)."
          if live else "aL ms     = not measured: torch or auto_LiRPA does not import (no stored times for these models).")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="all",
                   help=f"comma list of {', '.join(MODELS)}, or a prefix such as 'resnet4b' (default all)")
    p.add_argument("--methods", default="ibp,crown",
                   help=f"comma list of {', '.join(core.METHODS)} (default ibp,crown)")
    p.add_argument("--depth", type=int, default=1, help="transformer blocks (default 1, the example's)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls after one warm-up (default 10)")
    p.add_argument("--budget-s", type=float, default=30.0, help="stop repeating once this is spent (at least 3 calls)")
    p.add_argument("--threads", type=int, default=1,
                   help="cores per run (1: single-threaded XLA, pinned; 0: XLA's default)")
    p.add_argument("--timeout", type=float, default=600.0, help="kill a config running longer than this (default 600)")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(json.loads(args._child))

    models = core.parse_list(args.models, MODELS, "model")
    methods = core.parse_list(args.methods, core.METHODS, "method")
    try:
        import auto_LiRPA  # noqa: F401
        import torch  # noqa: F401
        live = True
    except ImportError as e:
        live = False
        print(f"auto_LiRPA comparison skipped: {e}")
    print(f"bench_graphs: {os.cpu_count()} CPUs, threads={args.threads}, loadavg {os.getloadavg()[0]:.2f}, "
          f"transformer depth {args.depth}", flush=True)
    base = {"threads": args.threads, "repeats": args.repeats, "budget_s": args.budget_s, "depth": args.depth}
    rows = []
    for model in models:
        for method in methods:
            cfg = {**base, "kind": "jaxlirpa", "model": model, "method": method}
            row = {"model": model, "method": method, "jaxlirpa": run_child(cfg, args.timeout)}
            if live:
                row["auto_LiRPA"] = run_child({**cfg, "kind": "auto_LiRPA"}, args.timeout)
            j = row["jaxlirpa"]
            print(f"  {model:<15} {method:<9} {j.get('status')}: compile {core._fmt(j.get('compile_s'), '.2f')} s, "
                  f"median {core._fmt(j.get('median_s') and j['median_s'] * 1e3, '.2f')} ms ({j['wall_s']:.0f} s)",
                  flush=True)
            rows.append(row)
    print(f"loadavg end {os.getloadavg()[0]:.2f}\n")
    print_table(rows, live)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
