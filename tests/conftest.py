"""Test-session set-up: XLA compiles with LLVM's cheap passes only.

The suite's models are tiny, so most of its time is compilation; the cheap passes cut it by a
quarter. They change how fast the compiled code runs, not what it computes (the tests compare
values with tolerances). Set before jax is imported; subprocesses (the examples) inherit it.
A user's ``XLA_FLAGS`` is kept."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
