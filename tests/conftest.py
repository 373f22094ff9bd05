"""Test-session set-up: XLA compiles with LLVM's cheap passes only, and emits CPU fusions with
its classic elemental emitter instead of the MLIR fusion emitters.

The suite's models are tiny, so most of its time is compilation; the cheap passes cut it by a
quarter, and the classic emitter halves what is left of a large program's compile (a CROWN
bound of composite activations: 8.6 s to 3.1-4.2 s on one core; the MLIR emitters build a
context and pattern sets per fusion). They change how fast the compiled code runs, not what
it computes (the tests compare values with tolerances); ``test_soundness`` also checks
programs compiled with XLA's default options. Set before jax is imported; subprocesses (the
examples) inherit it. A user's ``XLA_FLAGS`` is kept."""
import os

os.environ.setdefault("XLA_FLAGS", (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"))
