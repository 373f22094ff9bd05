"""The ``jaxlirpa`` command line.

    jaxlirpa verify MODEL.onnx PROP.vnnlib --timeout 116 --out result.txt

prints ``sat``, ``unsat``, ``timeout`` or ``unknown`` and writes the VNN-COMP result file
(with the counterexample for ``sat``). Compiled code is kept on disk between runs
(``--cache``), so only the first instance of an architecture pays for compilation.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from jaxlirpa.allocator import reuse_freed_memory

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlirpa" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = DEFAULT_CACHE) -> None:
    """Keep XLA's compiled programs in ``path`` across processes (None: don't)."""
    if path is None:
        return
    import jax

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def run_instance(model: str | os.PathLike, prop: str | os.PathLike, timeout: float, **options):
    """Load an ONNX network and a VNN-LIB property and verify it: a :class:`Verdict`
    whose ``seconds`` count everything, loading included."""
    from jaxlirpa import onnx, vnnlib
    from jaxlirpa.bab import verify

    start = time.monotonic()
    fn, input_shape = onnx.load(model)
    properties = vnnlib.read(prop, num_inputs=math.prod(input_shape[1:]))
    verdict = verify(fn, properties, input_shape=input_shape[1:],
                     timeout=max(timeout - (time.monotonic() - start), 1e-3), **options)
    verdict.seconds = time.monotonic() - start
    return verdict


def _verify_command(args) -> int:
    from jaxlirpa import vnnlib

    enable_compilation_cache(None if args.no_cache else args.cache)
    reuse_freed_memory()  # a process of its own: keep XLA:CPU's buffers mapped between runs
    verdict = run_instance(args.model, args.property, args.timeout, branching=args.branching,
                           progress=not args.quiet)
    print(verdict.status)
    if not args.quiet:
        print(f"{verdict.seconds:.2f}s, {verdict.domains} domains, {verdict.method}", file=sys.stderr)
    if args.out:
        x, y = verdict.counterexample if verdict.status == "sat" else (None, None)
        vnnlib.write_result(args.out, verdict.status, x=x, y=y)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxlirpa", description="Provable bounds and complete verification in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="decide an ONNX + VNN-LIB instance (sat / unsat / timeout / unknown)")
    verify.add_argument("model", help="the network, an .onnx file")
    verify.add_argument("property", help="the property, a .vnnlib file")
    verify.add_argument("--timeout", type=float, default=60.0, help="seconds, loading and compilation included")
    verify.add_argument("--out", help="write the VNN-COMP result file here")
    verify.add_argument("--branching", choices=("auto", "input", "relu"), default="auto")
    verify.add_argument("--cache", default=DEFAULT_CACHE, help="directory for compiled code kept across runs")
    verify.add_argument("--no-cache", action="store_true", help="do not keep compiled code on disk")
    verify.add_argument("--quiet", action="store_true", help="print the verdict only")
    args = parser.parse_args(argv)
    try:
        return _verify_command(args)
    except (ValueError, OSError) as error:
        print(f"jaxlirpa: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
