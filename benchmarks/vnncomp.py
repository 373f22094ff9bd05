"""Run every instance of a VNN-COMP benchmark folder and tabulate verdicts and times.

    python benchmarks/vnncomp.py ../shared/vnncomp/acasxu --truth ../shared/vnncomp/acasxu/truth.csv

Reads ``BENCH_DIR/*_instances.csv`` (onnx, vnnlib, timeout), verifies each instance in
this one process (compiled code is shared between networks of one architecture; the
first instance of each pays for compilation, reported apart as start-up), writes
``--out`` (a CSV of verdicts and times), and with ``--truth`` (a CSV with columns onnx,
vnnlib, verdict) counts correct answers and flags every wrong one.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from jaxlirpa.cli import enable_compilation_cache, run_instance


def _instances(bench: Path):
    found = sorted(bench.glob("*_instances.csv"))
    if not found:
        sys.exit(f"no *_instances.csv in {bench}")
    for path in found:
        for row in csv.reader(path.open()):
            if row and not row[0].startswith("#"):
                yield row[0].strip(), row[1].strip(), float(row[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", type=Path)
    parser.add_argument("--truth", type=Path, help="CSV with columns onnx, vnnlib, verdict")
    parser.add_argument("--out", type=Path, default=Path("vnncomp_results.csv"))
    parser.add_argument("--every", type=int, default=1, help="run every k-th instance only")
    parser.add_argument("--timeout", type=float, help="override the per-instance timeout (seconds)")
    parser.add_argument("--cache", default=None, help="persistent compilation cache directory (default: none)")
    args = parser.parse_args()
    enable_compilation_cache(args.cache)
    truth = {}
    if args.truth:
        truth = {(r["onnx"], r["vnnlib"]): r["verdict"] for r in csv.DictReader(args.truth.open())}
    rows, wrong = [], []
    start = time.monotonic()
    for k, (onnx_name, vnnlib_name, timeout) in enumerate(_instances(args.bench)):
        if k % args.every:
            continue
        timeout = args.timeout or timeout
        verdict = run_instance(args.bench / onnx_name, args.bench / vnnlib_name, timeout)
        expected = truth.get((onnx_name, vnnlib_name), "")
        if expected and verdict.status in ("sat", "unsat") and verdict.status != expected:
            wrong.append((onnx_name, vnnlib_name, verdict.status, expected))
        rows.append(dict(onnx=onnx_name, vnnlib=vnnlib_name, timeout=timeout, verdict=verdict.status,
                         seconds=round(verdict.seconds, 3), domains=verdict.domains, method=verdict.method,
                         truth=expected))
        print(f"{onnx_name} {vnnlib_name}: {verdict.status} in {verdict.seconds:.2f}s"
              f"{'' if not expected else ' (truth ' + expected + ')'}", flush=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    times = [r["seconds"] for r in rows]
    solved = [r for r in rows if r["verdict"] in ("sat", "unsat")]
    print(f"\n{len(solved)}/{len(rows)} solved ({sum(r['verdict'] == 'unsat' for r in rows)} unsat, "
          f"{sum(r['verdict'] == 'sat' for r in rows)} sat), {len(wrong)} wrong")
    print(f"total {sum(times):.1f}s, median {statistics.median(times):.2f}s, "
          f"first instance (start-up, compilation) {times[0]:.1f}s, wall {time.monotonic() - start:.1f}s")
    for w in wrong:
        print("WRONG:", *w)
    print(f"results: {args.out}")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
