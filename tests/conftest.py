"""Test-session set-up: XLA compiles with LLVM's cheap passes only, and emits CPU fusions with
its classic elemental emitter instead of the MLIR fusion emitters.

The suite's models are tiny, so most of its time is compilation; the cheap passes cut it by a
quarter, and the classic emitter halves what is left of a large program's compile (a CROWN
bound of composite activations: 8.6 s to 3.1-4.2 s on one core; the MLIR emitters build a
context and pattern sets per fusion). They change how fast the compiled code runs, not what
it computes (the tests compare values with tolerances); ``test_soundness`` also checks
programs compiled with XLA's default options. Set before jax is imported; subprocesses (the
examples, pytest-xdist's workers) inherit it. A user's ``XLA_FLAGS`` is kept."""
import os
import subprocess
import sys

CHEAP_PASSES = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CLASSIC_EMITTER = "--xla_cpu_use_fusion_emitters=false"


def _known_to_xla(flags: str) -> bool:
    """Whether this jaxlib's XLA takes ``flags``: it aborts a process whose ``XLA_FLAGS`` name
    a flag it does not know, and the classic emitter's flag will go when that emitter does."""
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env={**os.environ, "XLA_FLAGS": flags}, capture_output=True).returncode == 0


if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"{CHEAP_PASSES} {CLASSIC_EMITTER}" if _known_to_xla(CLASSIC_EMITTER) else CHEAP_PASSES
