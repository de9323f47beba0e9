"""Run every benchmark and collect their tables into one Markdown file.

Usage::

    python benchmarks/run_all.py --quick                      # < 15 min on 2 CPU cores
    python benchmarks/run_all.py --out results.md             # the full set (about an hour on 2 cores)
    FEATX_THINGSVISION_PYTHON=/path/to/venv/bin/python python benchmarks/run_all.py --quick

``--classical-store`` names a labelled store for the C-search benchmark (e.g. CIFAR-10's, see README.md);
without one that benchmark is skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--classical-store")
    parser.add_argument("--out", help="the collected tables [default: WORKDIR/results.md]")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    args = parser.parse_args()
    args.out = args.out or os.path.join(args.workdir, "results.md")
    quick = ["--quick"] if args.quick else []
    work = ["--workdir", args.workdir]
    runs = [
        ["bench_extract.py", *quick, *work],
        ["bench_decode.py", *quick, *work],
        ["bench_machinery.py", *quick, *work],
        ["bench_store.py", *quick, *work],
        ["bench_memory.py", *quick, *work],
        ["bench_finetune.py", *quick, *work],
    ]
    if args.classical_store:
        runs += [
            ["bench_classical.py", args.classical_store, "--classifier", name, "--baseline", *quick]
            for name in ("logreg", "svm")
        ]
    else:
        print("no --classical-store: skipping the C-search benchmark (see benchmarks/README.md)", file=sys.stderr)
    sections, failed, t_all = [], [], time.perf_counter()
    for run in runs:
        t0 = time.perf_counter()
        print(f"== {' '.join(run)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(HERE / run[0]), *run[1:]], capture_output=True, text=True)
        took = time.perf_counter() - t0
        body = proc.stdout if proc.returncode == 0 else f"FAILED ({proc.returncode}):\n```\n{proc.stderr[-3000:]}\n```"
        sections.append(f"## `{' '.join(run)}` ({took / 60:.1f} min)\n\n{body}")
        print(f"   {took / 60:.1f} min, exit {proc.returncode}", file=sys.stderr, flush=True)
        if proc.returncode:
            failed.append(run[0])
    sections.append(f"Total: {(time.perf_counter() - t_all) / 60:.1f} min.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their sections in {args.out} hold the error)")


if __name__ == "__main__":
    main()
