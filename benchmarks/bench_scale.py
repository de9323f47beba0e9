"""The classical stage at scale (issue 28): seconds and peak memory per preset and array path, and what is refused.

Usage::

    python benchmarks/bench_scale.py run [--sizes 10k 100k 1M] [--presets logreg svm ...] [--max-iter 30]
    python benchmarks/bench_scale.py calibrate        # the memory constants of featx/classify/memory.py
    python benchmarks/bench_scale.py caltech [--path numpy|torch]   # the logreg search at Caltech-101 size
    python benchmarks/bench_scale.py probe [--n 1281167] [--k 1000]   # the CUDA probe of benchmarks/gpu_check.sh
    python benchmarks/bench_scale.py measure PRESET N D K [--path numpy] [--max-iter 30]   # one child run

Features are synthetic: L2-normalised Gaussian classes (class means at a scale that leaves a linear probe short
of perfect), float32, generated in blocks. The sizes pair N with the classes as a linear-probe benchmark does:
10k with 10 classes, 100k with 100, 1M with 1,000 (d = 1,280, EfficientNet's width). Every fit runs in a fresh
process, as featx's search runs it on a val split (80 / 20) but for one value (C = 1, alpha = 1e-4, k = 10), then
the refit on the 80 %, with its iterations capped (``--max-iter``; the refit's retries off): the numbers are
seconds and peak memory of that search point and refit, not of a converged search over the grid. Before each run
featx's memory estimate (:mod:`featx.classify.memory`) is checked against the memory available: a fit that would
not fit is refused, with its numbers, as featx refuses it.

``calibrate`` measures the working set (peak RSS, ``VmHWM`` reset once the features exist, minus the RSS then)
of each preset at three small sizes (logreg at six, up to 100k rows) and solves for the constants of its
:class:`~featx.classify.memory.Footprint` by relative least squares.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's featx before an installed one
from _common import machine_line, run_child, table

SIZES = {"10k": (10_000, 10), "100k": (100_000, 100), "1M": (1_000_000, 1000)}
D = 1280
PRESETS = ("logreg", "svm", "sgd", "ridge", "knn")
VALUES = {"logreg": 1.0, "svm": 1.0, "sgd": 1e-4, "ridge": 1.0, "knn": 10.0, "chance": None}
#: (n, d, k) of the calibration runs: two sizes in n and one in k, so the three constants are determined.
CALIBRATION = ((6000, 1280, 10), (12000, 1280, 10), (8000, 640, 200))
#: logreg's per-class term is what decides ImageNet scale: two runs where it dominates, and one at 100k rows.
CALIBRATION_MORE = {"logreg": ((6000, 256, 1000), (12000, 256, 500), (100_000, 1280, 100))}


def features(n: int, d: int, k: int, seed: int = 0, scale: float = 0.05):
    """``n × d`` float32 L2-normalised Gaussian-class features and their labels, made in blocks (no float64 copy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    X = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        block = slice(start, min(n, start + 65536))
        X[block] = centres[y[block]] * scale + rng.standard_normal((block.stop - block.start, d), dtype=np.float32) / (
            d**0.5
        )
        X[block] /= np.linalg.norm(X[block], axis=1, keepdims=True)
    return X, y


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(
    preset_name: str, n: int, d: int, k: int, path: str, max_iter: int | None, search: bool, scale: float = 0.05
) -> dict:
    """One fit in this process: seconds, peak RSS and the working set beyond the features."""
    import numpy as np

    import featx.classify.training as training
    from featx.classify import ClassifierConfig
    from featx.classify.training import fit_in_memory

    training._REFIT_RETRIES = 0  # iterations capped: one fit, however far it got
    params = {} if max_iter is None or preset_name in ("ridge", "knn", "chance") else {"max_iter": max_iter}
    value = VALUES[preset_name]
    if search:  # one grid value through the search (a val split), then the refit: the search's working set too
        config = ClassifierConfig(classifier=preset_name, grid=(value,), params=tuple(params.items()))
    else:
        config = ClassifierConfig(
            classifier=preset_name, value=value if value is not None else "auto", params=tuple(params.items())
        )
    preset = config.preset
    warm_X, warm_y = features(300, d, min(k, 30), seed=1)  # lazy imports and first-call pools before the baseline
    fit_in_memory(warm_X, warm_y, np.array(["train"] * 240 + ["val"] * 60), preset, config, n_jobs=1, array_path=path)
    X, y = features(n, d, k, scale=scale)
    splits = np.array(["train"] * int(0.8 * n) + ["val"] * (n - int(0.8 * n))) if search else np.full(n, "train")
    del warm_X, warm_y
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    fitted = fit_in_memory(X, y, splits, preset, config, n_jobs=1, array_path=path)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {
        "preset": preset_name,
        "path": fitted.trained_on["array_path"],
        "n": n,
        "d": d,
        "k": k,
        "n_fit": int((splits == "train").sum()),
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "held_bytes": X.nbytes,
        "work_bytes": peak - base,
        "n_iter": fitted.refit.get("n_iter"),
        "max_iter": max_iter,
    }


def calibrate(args) -> None:
    import numpy as np

    from featx.classify import memory

    rows, constants = [], {}
    presets = args.presets or ("logreg", "svm", "sgd", "ridge", "knn", "chance")
    for name in presets:
        for path in ["numpy"] + (["torch"] if name == "logreg" else []):
            runs = []
            for n, d, k in CALIBRATION + CALIBRATION_MORE.get(name, ()):
                r = run_child(
                    [
                        __file__,
                        "measure",
                        name,
                        str(n),
                        str(d),
                        str(k),
                        "--path",
                        path,
                        "--max-iter",
                        str(args.max_iter),
                        "--search",
                    ]
                )
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
            # Relative least squares (each run weighs the same, small or large); the torch path also gets a k × d
            # term (lbfgs's history and the coefficients, which torch keeps beside their NumPy copies).
            A = np.array(
                [[r["n_fit"] * r["d"] * 4, r["n_fit"] * r["k"] * 8, r["k"] * r["d"] * 8, 2**20] for r in runs], float
            )
            if path == "numpy":
                A[:, 2] = 0.0
            b = np.array([r["work_bytes"] for r in runs], dtype=float)
            fitted = np.linalg.lstsq(A / b[:, None], np.ones(len(b)), rcond=None)[0]
            constants[f"{name}/{path}"] = [round(float(c), 2) for c in fitted]
            for r in runs:
                est = memory.estimate(name, r["n"], r["d"], r["k"], n_fit=r["n_fit"], path=path)
                rows.append(
                    [
                        name,
                        path,
                        f"{r['n']:,} × {r['d']:,} × {r['k']}",
                        f"{r['seconds']:.1f}",
                        f"{r['work_bytes'] / 2**20:.0f}",
                        f"{est.work / 2**20:.0f}",
                        f"{est.work / max(r['work_bytes'], 1) - 1:+.0%}",
                    ]
                )
    print(machine_line())
    print()
    print(
        table(
            [
                "preset",
                "path",
                "N × d × classes",
                "s",
                "measured work MiB",
                "estimate MiB (current constants)",
                "estimate vs measured",
            ],
            rows,
        )
    )
    print()
    print("fitted (per_feature, per_class, per_weight, fixed_mib):", json.dumps(constants))


def run(args) -> None:
    from featx.classify import memory

    available = memory.available_bytes() if args.memory_gib is None else int(args.memory_gib * 2**30)
    rows = []
    paths = list(args.paths)
    done = {}  # measurements kept from earlier runs (--record), reused rather than run again
    if args.record and Path(args.record).exists():
        for line in Path(args.record).read_text().splitlines():
            r = json.loads(line)
            done[(r["preset"], r["path"], r["n"], r["d"], r["k"])] = r
    for size in args.sizes:
        n, k = SIZES[size]
        for name in args.presets:
            for path in paths:
                if path != "numpy" and name != "logreg":
                    continue
                est = memory.estimate(name, n, D, k, n_fit=int(0.8 * n), path=path)
                label = [size, f"{k:,}", name, path, f"{est.peak / 2**30:.2f}"]
                if est.peak > available:
                    rows.append([*label, "refused", "", "", f"estimate over {available / 2**30:.1f} GiB"])
                    continue
                if size in args.estimate_only:
                    rows.append([*label, "not run", "", "", "estimate only (time)"])
                    continue
                r = done.get((name, path, n, D, k))
                if r is None and args.reuse_only:
                    rows.append([*label, "not run", "", "", "not measured (time)"])
                    continue
                if r is None:
                    try:
                        child = [__file__, "measure", name, str(n), str(D), str(k), "--path", path, "--search"]
                        child += ["--max-iter", str(args.max_iter), "--scale", str(args.scale)]
                        r = run_child(child, timeout=args.timeout)
                    except Exception as exc:  # a child killed or timed out: say so in the table
                        rows.append([*label, "failed", "", "", str(exc).splitlines()[0][:80]])
                        continue
                    if args.record:
                        with open(args.record, "a") as f:
                            f.write(json.dumps(r) + "\n")
                off = est.peak / (r["held_bytes"] + r["work_bytes"]) - 1
                rows.append(
                    [
                        *label,
                        f"{r['seconds']:.1f}",
                        f"{r['peak_rss_bytes'] / 2**30:.2f}",
                        f"{off:+.0%}",
                        f"n_iter {r['n_iter']} (cap {r['max_iter']})" if r["n_iter"] else "",
                    ]
                )
                print(rows[-1], file=sys.stderr, flush=True)
    print(machine_line())
    where = "given by --memory-gib" if args.memory_gib is not None else "available at the start"
    print(f"memory the estimates are checked against: {available / 2**30:.1f} GiB ({where})")
    print()
    print(
        table(
            [
                "N",
                "classes",
                "preset",
                "path",
                "estimate GiB",
                "seconds",
                "peak RSS GiB",
                "estimate vs features + measured work",
                "note",
            ],
            rows,
        )
    )


def caltech(args) -> None:
    """The logreg search (featx's default: the C grid, widened and refined, warm starts) on a Caltech-101-sized
    set: 102 classes of 20 images (12 train, 4 val, 4 test), 1,280 features, 1,632 labelled rows."""
    import inspect

    import numpy as np

    from featx.classify import ClassifierConfig
    from featx.classify.training import fit_in_memory

    k, per = 102, 20
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(k), per)
    X = (
        rng.normal(size=(k, D)).astype(np.float32)[y] * args.scale
        + rng.standard_normal((len(y), D), dtype=np.float32) / D**0.5
    )
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    role = np.tile(np.array(["train"] * 12 + ["val"] * 4 + ["test"] * 4), k)
    labelled = role != "test"
    config = ClassifierConfig(classifier="logreg")
    kwargs = {"n_jobs": args.n_jobs}
    if "array_path" in inspect.signature(fit_in_memory).parameters:  # the main branch has no array path
        kwargs["array_path"] = args.path
    t0 = time.perf_counter()
    fitted = fit_in_memory(X[labelled], y[labelled], role[labelled], config.preset, config, **kwargs)
    seconds = time.perf_counter() - t0
    accuracy = float((fitted.pipeline.predict(X[~labelled]) == y[~labelled]).mean())
    print(
        json.dumps(
            {
                "path": fitted.trained_on.get("array_path", "numpy (main)"),
                "C": fitted.value,
                "test_accuracy": accuracy,
                "seconds": round(seconds, 2),
                "search_seconds": round(fitted.search.seconds, 2),
            }
        )
    )


def probe(args) -> None:
    """The ImageNet-scale linear probe on CUDA (issue 28): logreg on N × 1,280 features, K classes, at most
    ``--max-iter`` lbfgs iterations, timed per iteration against the NumPy path on ``--cpu-rows`` of the rows (a
    full CPU fit at this size takes hours; its time per iteration grows linearly in N, so it is scaled up)."""
    import numpy as np
    import torch

    import featx.classify.training as training
    from featx.classify import ClassifierConfig, memory
    from featx.classify.training import fit_in_memory
    from featx.exceptions import InsufficientMemoryError

    training._REFIT_RETRIES = 0
    preset = ClassifierConfig(classifier="logreg").preset
    out = {
        "n": args.n,
        "d": D,
        "k": args.k,
        "max_iter": args.max_iter,
        "cpu_max_iter": args.cpu_max_iter,
        "device": None,
    }
    t0 = time.perf_counter()
    X, y = features(args.n, D, args.k, scale=0.004)  # a probe short of perfect: lbfgs keeps iterating
    out["generate_seconds"] = round(time.perf_counter() - t0, 1)
    splits = np.full(args.n, "train")
    for path, rows, max_iter in (("numpy", args.cpu_rows, args.cpu_max_iter), ("cuda", args.n, args.max_iter)):
        config = ClassifierConfig(classifier="logreg", value=1.0, params=(("max_iter", max_iter),))
        if path == "cuda" and not torch.cuda.is_available():
            out["cuda"] = "no CUDA device"
            continue
        est = memory.estimate("logreg", rows, D, args.k, path=path)
        out[f"{path}_estimate_gib"] = round(est.peak / 2**30, 2)
        if path == "cuda":
            out["device"] = torch.cuda.get_device_name(0)
            out["cuda_free_gib"] = round(torch.cuda.mem_get_info()[0] / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        for _ in range(4):  # refused up front on a GPU too small for the estimate: half the rows, and say so
            try:
                t0 = time.perf_counter()
                fitted = fit_in_memory(X[:rows], y[:rows], splits[:rows], preset, config, n_jobs=1, array_path=path)
                break
            except InsufficientMemoryError as exc:
                out.setdefault(f"{path}_refused", []).append(str(exc).split(";")[0])
                rows //= 2
        else:
            continue
        if path == "cuda":
            torch.cuda.synchronize()
            out["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        seconds = time.perf_counter() - t0
        n_iter = max(int(fitted.refit["n_iter"] or 1), 1)
        out[f"{path}_rows"] = rows
        out[f"{path}_seconds"] = round(seconds, 2)
        out[f"{path}_n_iter"] = n_iter
        out[f"{path}_s_per_iter_at_n"] = round(seconds / n_iter * args.n / rows, 3)
        out[f"{path}_path"] = fitted.trained_on["array_path"]
        print(json.dumps(out), file=sys.stderr, flush=True)
    if "cuda_s_per_iter_at_n" in out:
        out["cpu_over_cuda_per_iter"] = round(out["numpy_s_per_iter_at_n"] / out["cuda_s_per_iter_at_n"], 1)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--paths", nargs="+", default=["numpy", "torch"], choices=["numpy", "torch", "cuda"])
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--estimate-only", nargs="*", default=[], help="sizes whose fits are estimated, not run")
    p.add_argument("--memory-gib", type=float, help="the memory to check estimates against (default: available)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--record", help="JSON lines of the measurements: appended to, and reused by a later run")
    p.add_argument("--reuse-only", action="store_true", help="only the measurements in --record; run nothing")
    p.add_argument("--scale", type=float, default=0.004, help="class means' scale: 0.004 keeps lbfgs iterating")
    p = sub.add_parser("calibrate")
    p.add_argument("--presets", nargs="+")
    p.add_argument("--max-iter", type=int, default=20)
    p = sub.add_parser("caltech")
    p.add_argument("--path", default="numpy", choices=["numpy", "torch", "cuda", "auto"])
    p.add_argument("--n-jobs", type=int, default=-1)
    p.add_argument("--scale", type=float, default=0.0045, help="the class means' scale (test accuracy about 0.57)")
    p = sub.add_parser("probe")
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--cpu-rows", type=int, default=65536)
    p.add_argument("--cpu-max-iter", type=int, default=3)
    p = sub.add_parser("measure")
    p.add_argument("preset")
    p.add_argument("n", type=int)
    p.add_argument("d", type=int)
    p.add_argument("k", type=int)
    p.add_argument("--path", default="numpy")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--search", action="store_true", help="one grid value through the search on a val split first")
    p.add_argument("--scale", type=float, default=0.05, help="the class means' scale (0.05: separable, for memory)")
    args = parser.parse_args()
    if args.command == "measure":
        print(
            json.dumps(measure(args.preset, args.n, args.d, args.k, args.path, args.max_iter, args.search, args.scale))
        )
    else:
        {"run": run, "calibrate": calibrate, "caltech": caltech, "probe": probe}[args.command](args)


if __name__ == "__main__":
    main()
