"""Core timing benchmark: IBP and CROWN through ``jaxlirpa.bound`` on an MLP and CNN-B.

Not a test: run it by hand, never from CI.

    python benchmarks/bench_core.py                      # defaults: every model, ibp + crown, 1 thread
    python benchmarks/bench_core.py --models mlp_b1,perf_cnnb_b1 --methods all --json out.json

Every (model, method) pair runs in a fresh subprocess (so peak RSS, thread settings and a
crash or memory blow-up belong to that pair alone) under a compile timeout, a wall-clock
timeout and a memory limit. In each subprocess the bound is compiled as
``jax.jit(lambda params, x: jaxlirpa.bound(partial(apply, params), x, eps, method=m),
compiler_options=jaxlirpa.compiler_options(m))`` (as the README advises; ``--xla-defaults``: without):
trace+lower and XLA compile are timed apart from the steady-state calls (median and min of
``--repeats`` calls after one warm-up call, each ``jax.block_until_ready``). The un-jitted
``jaxlirpa.bound(...)`` call (which re-traces ``fn`` on every call) is timed too, as ``api ms``.

Ratios are against baselines measured in the same invocation: a 2048^3 float32 matmul under
the same thread settings (the machine's practical GFLOP/s), and auto_LiRPA when it imports
(else auto_LiRPA's stored median times from ``../shared/oracle/manifest.json``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORACLE_MANIFEST = REPO.parent / "shared" / "oracle" / "manifest.json"

# name -> (family, batch, eps, oracle perf case reused as the model or None)
MODELS = {
    "mlp_b1": ("mlp", 1, None, None),
    "mlp_b32": ("mlp", 32, None, None),
    "cnnb_b1": ("cnnb", 1, Fraction(2, 255), None),
    "cnnb_b16": ("cnnb", 16, Fraction(2, 255), None),
    "perf_mlp4_b1": ("mlp", 1, None, "perf_mlp4_b1"),
    "perf_mlp4_b32": ("mlp", 32, None, "perf_mlp4_b32"),
    "perf_cnnb_b1": ("cnnb_nopad", 1, None, "perf_cnnb_b1"),
    "perf_cnnb_b16": ("cnnb_nopad", 16, None, "perf_cnnb_b16"),
}
# random-weight models -> the stored case of the same shapes (different weights)
NEAREST_STORED = {"mlp_b1": "perf_mlp4_b1", "mlp_b32": "perf_mlp4_b32"}
METHODS = ("ibp", "crown", "crown-ibp", "forward", "alpha-crown")
MATMUL_N = 2048
DEFAULT_METHODS = ("ibp", "crown")
AUTO_LIRPA_METHOD = {"ibp": "IBP", "crown": "CROWN", "crown-ibp": "CROWN-IBP", "forward": "Forward",
                     "alpha-crown": "alpha-CROWN"}

# layer lists in PyTorch layout: (op, name-or-args)
LAYERS = {
    "mlp": [("linear", "fc1"), ("relu",), ("linear", "fc2"), ("relu",), ("linear", "fc3"), ("relu",),
            ("linear", "fc4")],
    "cnnb": [("pad", (1, 2, 1, 2)), ("conv", "conv1", 2, 0), ("relu",), ("conv", "conv2", 2, 1), ("relu",),
             ("flatten",), ("linear", "fc1"), ("relu",), ("linear", "fc2")],
}
LAYERS["cnnb_nopad"] = LAYERS["cnnb"][1:]
SHAPES = {  # input shape per example, parameter shapes (PyTorch layout)
    "mlp": ((784,), {"fc1": (1024, 784), "fc2": (1024, 1024), "fc3": (1024, 1024), "fc4": (10, 1024)}),
    "cnnb": ((3, 32, 32), {"conv1": (32, 3, 5, 5), "conv2": (128, 32, 4, 4), "fc1": (250, 8192), "fc2": (10, 250)}),
}


# ----------------------------------------------------------------------------------------
# child: one (model, method) in a fresh process
# ----------------------------------------------------------------------------------------


def _limit_threads(threads: int) -> None:
    """Before jax/torch import: pin to ``threads`` cores; one thread also sets XLA's flags."""
    if threads <= 0:
        return
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false"  # XLA stops reading its flags at a bare word
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _emit(**kw) -> None:
    print("@@" + json.dumps(kw), flush=True)


def _numpy_model(cfg: dict):
    """``(layers, params, x0, eps)`` as numpy, PyTorch layout; He init with fixed seeds."""
    import numpy as np

    family, batch, eps, case = MODELS[cfg["model"]]
    if case is not None:
        data = np.load(ORACLE_MANIFEST.parent / "cases" / f"{case}.npz")
        params = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
        meta = json.loads(ORACLE_MANIFEST.read_text())["cases"][case]
        return LAYERS[family], params, data["x0"], float(meta["specs"]["linf"]["eps"])
    if family == "mlp":
        eps = Fraction(cfg["mlp_eps"])
    in_shape, shapes = SHAPES[family]
    rng = np.random.default_rng(20240 + sum(map(ord, cfg["model"])))
    params = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        params[f"{name}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params[f"{name}.bias"] = np.zeros(shape[0], np.float32)
    x0 = rng.uniform(0.0, 1.0, (batch, *in_shape)).astype(np.float32)
    return LAYERS[family], params, x0, float(eps)


def _jax_apply(layers):
    """``apply(params, x)`` in PyTorch layout (what ``tests/oracle.py`` builds for the perf cases)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def apply(params, x):
        for op, *args in layers:
            if op == "linear":
                x = x @ params[f"{args[0]}.weight"].T + params[f"{args[0]}.bias"]
            elif op == "conv":
                name, stride, pad = args
                x = lax.conv_general_dilated(x, params[f"{name}.weight"], (stride, stride), [(pad, pad)] * 2,
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
                x = x + params[f"{name}.bias"][None, :, None, None]
            elif op == "pad":  # ZeroPad2d((left, right, top, bottom))
                left, right, top, bottom = args[0]
                x = jnp.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
            elif op == "relu":
                x = jax.nn.relu(x)
            elif op == "flatten":
                x = x.reshape(x.shape[0], -1)
        return x

    return apply


def _cost_flops(compiled):
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def _xla_bytes(compiled):
    try:
        ma = compiled.memory_analysis()
    except Exception:
        return None
    if ma is None:
        return None
    return {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}


def _time_calls(call, repeats: int, budget_s: float) -> dict:
    """Warm-up call, then up to ``repeats`` timed calls (at least 3, or only the warm-up call
    if it alone exceeds the budget; stops early once ``budget_s`` is spent). Wall and process
    CPU seconds per call: with one thread CPU time is close to the wall time an otherwise idle
    core would give, so it stays comparable when the machine is shared."""
    c0, t0 = time.process_time(), time.perf_counter()
    call()
    warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
    times, cpus = [], []
    if warm > budget_s:
        times, cpus = [warm], [warm_cpu]
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < min(3, repeats) or time.perf_counter() - start < budget_s):
        c, t = time.process_time(), time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"times_s": times, "cpu_times_s": cpus, "median_s": float(statistics.median(times)), "min_s": min(times),
            "median_cpu_s": float(statistics.median(cpus)), "cpu_per_wall": sum(cpus) / sum(times),
            "first_call_s": warm}


def child_jaxlirpa(cfg: dict) -> dict:
    import numpy as np

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO))
    import jaxlirpa

    layers, params_np, x0, eps = _numpy_model(cfg)
    method = cfg["method"]
    if MODELS[cfg["model"]][3] is not None:  # the oracle's own rebuild of the stored case
        sys.path.insert(0, str(REPO / "tests"))
        import oracle

        case = oracle.load_case(MODELS[cfg["model"]][3])
        apply, params = case.apply, dict(case.params)
        assert np.allclose(np.asarray(apply(params, x0)), case.y0, atol=1e-4), "oracle model rebuild mismatch"
    else:
        apply, params = _jax_apply(layers), {k: jnp.asarray(v) for k, v in params_np.items()}
    x = jnp.asarray(x0)
    rec = {"eps": eps, "batch": int(x.shape[0])}
    rss0 = _maxrss_mb()

    kw = {"batch_size": cfg["batch_size"]} if cfg.get("batch_size") else {}
    if method == "alpha-crown":
        return _child_alpha(cfg, jaxlirpa, functools.partial(apply, params), x, eps, kw, rec, rss0)
    options = None if cfg.get("xla_defaults") else jaxlirpa.compiler_options(method)
    fn = jax.jit(lambda p, xx: jaxlirpa.bound(functools.partial(apply, p), xx, eps, method=method, **kw),
                 compiler_options=options)
    _emit(phase="trace")
    t = time.perf_counter()
    lowered = fn.lower(params, x)
    rec["trace_s"] = time.perf_counter() - t
    _emit(phase="compile")
    t = time.perf_counter()
    compiled = lowered.compile()
    rec["compile_s"] = time.perf_counter() - t
    rec["rss_compile_mb"] = _maxrss_mb() - rss0
    rec["rss_base_mb"] = rss0
    rec["flops"] = _cost_flops(compiled)
    rec["xla_bytes"] = _xla_bytes(compiled)
    need = None if rec["xla_bytes"] is None else sum(rec["xla_bytes"][k] for k in ("argument", "output", "temp"))
    if need is not None and need > cfg["mem_limit_gb"] * 2**30:
        rec["status"] = f"skipped: needs {need / 2**30:.1f} GB > limit {cfg['mem_limit_gb']:.1f} GB"
        return rec

    _emit(phase="run")
    rec.update(_time_calls(lambda: jax.block_until_ready(compiled(params, x)), cfg["repeats"], cfg["budget_s"]))
    rec["rss_run_mb"] = _maxrss_mb() - rss0
    b = compiled(params, x)
    rec["finite"] = bool(np.isfinite(np.asarray(b.lower)).all() and np.isfinite(np.asarray(b.upper)).all())
    rec["mean_width"] = float(np.mean(np.asarray(b.upper) - np.asarray(b.lower)))

    if cfg["api"] and (rec["median_s"] < cfg["api_max_s"] or method == "crown"):  # crown: staged un-jitted
        _emit(phase="api")
        f = functools.partial(apply, params)
        api = _time_calls(lambda: jax.block_until_ready(jaxlirpa.bound(f, x, eps, method=method, **kw)),
                          cfg["repeats"] if method == "crown" else min(3, cfg["repeats"]), cfg["budget_s"])
        rec["api_median_s"] = api["median_s"]
    rec["rss_peak_mb"] = _maxrss_mb()
    rec["matmul"] = child_matmul(cfg)  # after the RSS reading: same process, same moment, same threads
    rec["status"] = "ok"
    return rec


def _child_alpha(cfg, jaxlirpa, f, x, eps, kw, rec, rss0) -> dict:
    """alpha-CROWN is timed as users call it, un-jitted: ``bound`` first runs CROWN and reads how
    many neurons are unstable, to size the rows it re-bounds (under an outer jit it re-bounds
    every neuron). Settings of the oracle: 20 iterations, Adam, lr 0.1, decay 0.98, lower and
    upper bounds in separate runs. The first call (traces and compiles both programs) is
    reported as compile time minus one steady call; ``--alpha-all-rows`` also times
    ``sparse_intermediate=False`` (every neuron re-bounded) in the same process."""
    import numpy as np

    import jax

    def timed(opts):
        call = lambda: jax.block_until_ready(jaxlirpa.bound(f, x, eps, method="alpha-crown", alpha=opts, **kw))
        start = time.perf_counter()
        call()  # traces and compiles; _time_calls' own warm-up call is then a steady one
        first = time.perf_counter() - start
        return {**_time_calls(call, cfg["repeats"], cfg["budget_s"]), "first_call_s": first}

    opts = jaxlirpa.AlphaOptions(iterations=20, learning_rate=0.1)
    _emit(phase="run")
    rec.update(timed(opts))
    rec["trace_s"], rec["compile_s"] = None, rec["first_call_s"] - rec["median_s"]
    rec["rss_base_mb"], rec["rss_run_mb"] = rss0, _maxrss_mb() - rss0
    b = jaxlirpa.bound(f, x, eps, method="alpha-crown", alpha=opts, **kw)
    rec["finite"] = bool(np.isfinite(np.asarray(b.lower)).all() and np.isfinite(np.asarray(b.upper)).all())
    rec["mean_width"] = float(np.mean(np.asarray(b.upper) - np.asarray(b.lower)))
    if cfg.get("alpha_all_rows"):
        _emit(phase="all rows")
        dense = timed(jaxlirpa.AlphaOptions(iterations=20, learning_rate=0.1, sparse_intermediate=False))
        rec["all_rows_median_s"], rec["all_rows_first_call_s"] = dense["median_s"], dense["first_call_s"]
    rec["rss_peak_mb"] = _maxrss_mb()
    rec["matmul"] = child_matmul(cfg)
    rec["status"] = "ok"
    return rec


def child_autolirpa(cfg: dict) -> dict:
    """auto_LiRPA on the same weights and input (only when it imports)."""
    import numpy as np
    import torch
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    layers, params, x0, eps = _numpy_model(cfg)
    mods = []
    for op, *args in layers:
        if op == "linear":
            W = params[f"{args[0]}.weight"]
            m = torch.nn.Linear(W.shape[1], W.shape[0])
        elif op == "conv":
            W = params[f"{args[0]}.weight"]
            m = torch.nn.Conv2d(W.shape[1], W.shape[0], W.shape[2:], stride=args[1], padding=args[2])
        elif op == "pad":
            mods.append(torch.nn.ZeroPad2d(args[0]))
            continue
        else:
            mods.append(torch.nn.ReLU() if op == "relu" else torch.nn.Flatten())
            continue
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.asarray(params[f"{args[0]}.weight"])))
            m.bias.copy_(torch.from_numpy(np.asarray(params[f"{args[0]}.bias"])))
        mods.append(m)
    net = torch.nn.Sequential(*mods).eval()
    x = torch.from_numpy(np.asarray(x0))
    _emit(phase="compile")
    t = time.perf_counter()
    model = BoundedModule(net, torch.empty_like(x))
    rec = {"eps": eps, "batch": int(x.shape[0]), "build_s": time.perf_counter() - t}
    bx = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), x_L=x - eps, x_U=x + eps))
    _emit(phase="run")
    method = AUTO_LIRPA_METHOD[cfg["method"]]
    with torch.no_grad():
        rec.update(_time_calls(lambda: model.compute_bounds(x=(bx,), method=method), cfg["repeats"], cfg["budget_s"]))
    rec.update(rss_peak_mb=_maxrss_mb(), status="ok")
    return rec


def child_matmul(cfg: dict) -> dict:
    """The machine's practical float32 rate: an ``n^3`` matmul, best of 5 calls after a warm-up."""
    import jax
    import jax.numpy as jnp

    n = cfg.get("n", MATMUL_N)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    t = _time_calls(lambda: jax.block_until_ready(compiled(a, b)), 5, 10.0)
    return {"n": n, "min_s": t["min_s"], "gflops": 2 * n**3 / t["min_s"] / 1e9, "cpu_per_wall": t["cpu_per_wall"],
            "status": "ok"}


def child_main(cfg: dict) -> None:
    _limit_threads(cfg["threads"])
    if not cfg.get("malloc_defaults") and cfg["kind"] != "auto_LiRPA":
        from jaxlirpa.allocator import reuse_freed_memory

        reuse_freed_memory()
    kind = cfg["kind"]
    try:
        rec = {"matmul": child_matmul, "jaxlirpa": child_jaxlirpa, "auto_LiRPA": child_autolirpa}[kind](cfg)
    except Exception as e:  # reported in the table, not raised
        rec = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    _emit(phase="done", result=rec)


# ----------------------------------------------------------------------------------------
# parent: launch children, watch them, print the table
# ----------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(cfg: dict, args) -> dict:
    """Run one configuration in a fresh interpreter; kill it on compile timeout, total
    timeout or memory limit, and say which."""
    proc = subprocess.Popen([sys.executable, __file__, "--_child", json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state = {"phase": "start", "since": time.monotonic(), "result": None}
    err_tail: list[str] = []

    def read_out():
        for line in proc.stdout:
            if line.startswith("@@"):
                msg = json.loads(line[2:])
                state.update(phase=msg["phase"], since=time.monotonic())
                if msg["phase"] == "done":
                    state["result"] = msg["result"]

    def read_err():
        for line in proc.stderr:
            err_tail.append(line.rstrip())
            del err_tail[:-20]

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for r in readers:
        r.start()
    start, peak, killed = time.monotonic(), 0.0, None
    while proc.poll() is None:
        time.sleep(0.1)
        peak = max(peak, _rss_mb(proc.pid))
        now = time.monotonic()
        if peak > cfg["mem_limit_gb"] * 1024:
            killed = f"killed: RSS {peak / 1024:.1f} GB > limit {cfg['mem_limit_gb']:.1f} GB in {state['phase']}"
        elif state["phase"] in ("trace", "compile") and now - state["since"] > args.compile_timeout:
            killed = f"killed: {state['phase']} > {args.compile_timeout:.0f} s"
        elif now - start > args.timeout:
            killed = f"killed: total > {args.timeout:.0f} s (in {state['phase']})"
        if killed:
            proc.kill()
            break
    proc.wait()
    for r in readers:
        r.join(timeout=5)
    rec = state["result"] or {}
    if killed:
        rec["status"] = killed
    elif not rec:
        tail = next((l for l in reversed(err_tail) if l.strip()), "")
        rec["status"] = f"crashed (rc {proc.returncode}): {tail[:160]}"
    rec["parent_rss_peak_mb"] = peak
    rec["wall_s"] = time.monotonic() - start
    return rec


def _stored_autolirpa(model: str, method: str, mlp_eps: str):
    """(median wall s, median CPU s, exact?) from the oracle manifest, or (None, None, False)."""
    case = MODELS[model][3]
    exact = case is not None
    if case is None:
        case = NEAREST_STORED.get(model)
        if case is None or Fraction(mlp_eps) != Fraction(1, 255):
            return None, None, False
    try:
        entry = json.loads(ORACLE_MANIFEST.read_text())["cases"][case]["specs"]["linf"]["methods"]
        entry = entry[AUTO_LIRPA_METHOD[method]]
        return float(entry["median_time_s"]), entry.get("median_cpu_time_s"), exact
    except (OSError, KeyError):
        return None, None, False


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def _row_cells(r: dict, fallback_mm: float) -> tuple[list[str], str | None]:
    j, a, a_cpu = r["jaxlirpa"], r.get("auto_LiRPA_s"), r.get("auto_LiRPA_cpu_s")
    ok = j.get("status") == "ok"
    med, cpu = (j["median_s"], j["median_cpu_s"]) if ok else (None, None)
    flops = j.get("flops")
    rate = flops / med / 1e9 if flops and med else None
    mm = (j.get("matmul") or {}).get("gflops") or fallback_mm
    xb = j.get("xla_bytes")
    xla_mb = sum(xb[k] for k in ("argument", "output", "temp")) / 2**20 if xb else None
    rss = j.get("rss_peak_mb", 0) - j["rss_base_mb"] if ok else j.get("rss_compile_mb")
    mark = "" if r.get("auto_LiRPA_exact", True) else "~"
    ms = lambda v: None if v is None else v * 1e3
    ratio = lambda t, ref: mark + format(t / ref, ".2f") if t and ref else "-"
    cells = [r["model"], r["method"], _fmt(j.get("trace_s"), ".2f"), _fmt(j.get("compile_s"), ".2f"),
             _fmt(ms(med), ".2f"), _fmt(ms(j["min_s"]) if ok else None, ".2f"), _fmt(ms(cpu), ".2f"),
             _fmt(ms(j.get("api_median_s")), ".1f"), _fmt(flops and flops / 1e9, ".2f"), _fmt(rate, ".1f"),
             _fmt(mm if ok else None, ".0f"), _fmt(rate and 100 * rate / mm, ".0f"), _fmt(xla_mb, ".0f"),
             _fmt(rss, ".0f"), (mark + format(a * 1e3, ".2f")) if a else "-", ratio(med, a), ratio(cpu, a_cpu),
             ratio(j.get("api_median_s"), a)]
    return cells, None if ok else j.get("status")


COLUMNS = [("model", "<13"), ("method", "<9"), ("trace s", ">7"), ("compile s", ">9"), ("median ms", ">10"),
           ("min ms", ">10"), ("cpu ms", ">10"), ("api ms", ">7"), ("GFLOP", ">7"), ("GFLOP/s", ">7"),
           ("mm", ">3"), ("%mm", ">3"), ("XLA MB", ">6"), ("RSS MB", ">6"), ("aL ms", ">9"), ("t/t_aL", ">6"),
           ("c/c_aL", ">6"), ("api/aL", ">6")]


def print_table(rows: list[dict], fallback_mm: float, live_autolirpa: bool) -> None:
    head = "  ".join(format(c, s) for c, s in COLUMNS)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells, problem = _row_cells(r, fallback_mm)
        print("  ".join(format(c, s) for c, (_, s) in zip(cells, COLUMNS)))
        if problem:
            print(f"    ^ {problem}")
    print(f"""
trace s   = jax tracing + lowering (jit(...).lower); compile s = XLA compile (lowered.compile()).
median/min ms = steady-state calls of the compiled bound (block_until_ready), after one warm-up call.
            Compiled with jaxlirpa.compiler_options(method) (CPU, not IBP: no YNNPACK fusions) unless --xla-defaults.
            Every jaxlirpa process first calls jaxlirpa.reuse_freed_memory() (glibc keeps freed blocks: XLA's
            buffers skip page faults) unless --malloc-defaults.
cpu ms    = median process CPU time per call; with 1 thread, well below the wall time means the core was
            shared with other work (the wall times are then inflated; CPU times much less so).
api ms    = un-jitted jaxlirpa.bound(...) (re-traces fn on every call; CROWN runs in stages there, sizing its
            products by host reads, see jaxlirpa/methods/staged.py); '-' = not timed (call > 2 s, CROWN
            always timed); api/aL = api ms / aL ms.
GFLOP     = XLA cost_analysis flops of the compiled bound; GFLOP/s = GFLOP / median.
mm, %mm   = GFLOP/s of a {MATMUL_N}^3 float32 matmul timed in the same process just after, and GFLOP/s / mm.
XLA MB    = compiled.memory_analysis() argument + output + temp bytes.
RSS MB    = growth of peak RSS (ru_maxrss) of the fresh per-config process over its level before tracing
            (includes compilation and the api call's own compile).
alpha-crown rows: timed un-jitted, as users call it (it sizes its rows from the unstable neurons;
            under an outer jit it re-bounds every neuron); compile s = first call - median.""")
    if live_autolirpa:
        print("aL ms     = auto_LiRPA timed live in this run on the same weights and input; "
              "t/t_aL = median / aL ms (< 1: jaxlirpa faster);\n            c/c_aL = the same ratio of CPU times.")
    else:
        print("aL ms     = auto_LiRPA 0.7.1 median_time_s from ../shared/oracle/manifest.json "
              "(stored auto_LiRPA times, same kind of machine, 1 torch thread);\n"
              "            t/t_aL = median / aL ms (< 1: jaxlirpa faster); c/c_aL = the same ratio of median CPU times "
              "(stored too).\n            '~': nearest stored case, same shapes and "
              "eps but other weights\n            (auto_LiRPA's CROWN cost depends on how many neurons are unstable).")


def parse_list(s: str, known, what: str) -> list[str]:
    if s == "all":
        return list(known)
    out = []
    for tok in s.split(","):
        tok = tok.strip()
        hits = [k for k in known if k == tok] or [k for k in known if k.startswith(tok + "_")]
        if not hits:
            raise SystemExit(f"unknown {what} {tok!r}; choose from {', '.join(known)} or 'all'")
        out += [h for h in hits if h not in out]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="all",
                   help=f"comma list of {', '.join(MODELS)}, or a prefix such as 'mlp' or 'perf_cnnb' (default all)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHODS)}, or 'all' (default ibp,crown)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls after one warm-up (default 10)")
    p.add_argument("--budget-s", type=float, default=30.0,
                   help="stop repeating once this much time is spent (at least 3 calls; default 30)")
    p.add_argument("--threads", type=int, default=1,
                   help="cores per run (1: XLA single-threaded flags + pinned to one core, as the stored "
                        "auto_LiRPA times; 0: leave XLA alone; default 1)")
    p.add_argument("--mlp-eps", default="1/255", help="L-inf radius of the random MLPs (default 1/255; e.g. 2/255)")
    p.add_argument("--compile-timeout", type=float, default=60.0, help="kill a config whose trace or compile exceeds this")
    p.add_argument("--timeout", type=float, default=600.0, help="kill a config that runs longer than this in all")
    p.add_argument("--mem-limit-gb", type=float, default=20.0,
                   help="skip (XLA memory_analysis) or kill (RSS) a config above this; capped at 90%% of RAM")
    p.add_argument("--no-api", action="store_true", help="don't time the un-jitted jaxlirpa.bound call")
    p.add_argument("--xla-defaults", action="store_true",
                   help="jit the bound without jaxlirpa.compiler_options(method) (XLA default options)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc as it is (without jaxlirpa.reuse_freed_memory())")
    p.add_argument("--batch-size", type=int, default=None,
                   help="jaxlirpa.bound(batch_size=...): examples bounded at a time, to cap memory (default: all)")
    p.add_argument("--alpha-all-rows", action="store_true",
                   help="alpha-crown: also time sparse_intermediate=False (every neuron re-bounded), as a baseline")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(json.loads(args._child))

    models = parse_list(args.models, MODELS, "model")
    methods = parse_list(args.methods, METHODS, "method")
    Fraction(args.mlp_eps)  # validate early
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gb = float("inf")
    mem_limit = min(args.mem_limit_gb, 0.9 * ram_gb)
    base = {"batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats, "budget_s": args.budget_s, "mlp_eps": args.mlp_eps,
            "mem_limit_gb": mem_limit, "api": not args.no_api, "api_max_s": 2.0,
            "xla_defaults": args.xla_defaults, "malloc_defaults": args.malloc_defaults,
            "alpha_all_rows": args.alpha_all_rows}
    try:
        import importlib.util

        live = importlib.util.find_spec("auto_LiRPA") is not None and importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        live = False

    meta = {"python": platform.python_version(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "threads": args.threads, "ram_gb": ram_gb, "mem_limit_gb": mem_limit, "loadavg_start": os.getloadavg(),
            "auto_LiRPA": "live" if live else "stored (manifest)", "argv": sys.argv[1:]}
    try:
        meta["jax"] = subprocess.run([sys.executable, "-c", "import jax, jaxlib; print(jax.__version__)"],
                                     capture_output=True, text=True, timeout=120).stdout.strip()
    except subprocess.TimeoutExpired:
        pass
    try:  # read-only: which code was measured
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        meta["commit"] = git("rev-parse", "--short", "HEAD").strip() + (
            "+dirty" if git("status", "--porcelain", "--untracked-files=no", "jaxlirpa").strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        meta["commit"] = None
    print(f"bench_core: jaxlirpa {meta['commit']}, jax {meta.get('jax')}, {meta['cpus']} CPUs, threads={args.threads}, "
          f"loadavg {meta['loadavg_start'][0]:.2f}, mem limit {mem_limit:.1f} GB, auto_LiRPA {meta['auto_LiRPA']}",
          flush=True)

    mm = [run_child({**base, "kind": "matmul", "n": MATMUL_N}, args)]
    print(f"matmul {MATMUL_N}^3 f32 at start: {mm[0].get('gflops', float('nan')):.1f} GFLOP/s", flush=True)
    rows = []
    for model in models:
        for method in methods:
            cfg = {**base, "kind": "jaxlirpa", "model": model, "method": method}
            row = {"model": model, "method": method, "jaxlirpa": run_child(cfg, args)}
            j = row["jaxlirpa"]
            if live:
                row["auto_LiRPA"] = run_child({**cfg, "kind": "auto_LiRPA"}, args)
                a = row["auto_LiRPA"]
                row["auto_LiRPA_s"], row["auto_LiRPA_cpu_s"], row["auto_LiRPA_exact"] = (
                    a.get("median_s"), a.get("median_cpu_s"), True)
            else:
                row["auto_LiRPA_s"], row["auto_LiRPA_cpu_s"], row["auto_LiRPA_exact"] = _stored_autolirpa(
                    model, method, args.mlp_eps)
            print(f"  {model:<13} {method:<9} {j.get('status')}: compile {_fmt(j.get('compile_s'), '.2f')} s, "
                  f"median {_fmt(j.get('median_s') and j['median_s'] * 1e3, '.2f')} ms "
                  f"({len(j.get('times_s', []))} calls, {j['wall_s']:.0f} s)"
                  + (f"; every neuron re-bounded: {j['all_rows_median_s'] * 1e3:.0f} ms" if j.get("all_rows_median_s") else ""),
                  flush=True)
            row["loadavg_after"] = os.getloadavg()
            rows.append(row)
    mm.append(run_child({**base, "kind": "matmul", "n": MATMUL_N}, args))
    meta["loadavg_end"] = os.getloadavg()
    matmul_gflops = max(m.get("gflops", 0.0) for m in mm) or float("nan")
    print(f"matmul at end: {mm[1].get('gflops', float('nan')):.1f} GFLOP/s; "
          f"loadavg end {meta['loadavg_end'][0]:.2f}\n", flush=True)
    print_table(rows, matmul_gflops, live)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "matmul": mm, "rows": rows}, fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
