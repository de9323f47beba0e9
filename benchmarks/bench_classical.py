"""Time featx's hyper-parameter search on cached features, against a plain GridSearchCV.

Usage::

    featx extract ../shared/data/cifar10 --out cifar10.h5          # once (see benchmarks/README.md)
    python benchmarks/bench_classical.py cifar10.h5 --classifier logreg [--baseline] [--quick] [--jobs -1]

Prints one Markdown table row per run, to be pasted into ``benchmarks/RESULTS.md`` with the machine line
that it prints first. ``--quick`` uses 5,000 training images (seeded) so it finishes in minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line


def load(store_path: str, subset: int | None) -> tuple[np.ndarray, ...]:
    """Train (optionally ``subset`` seeded training rows) and test features and labels, read once for every run."""
    from featx.store import FeatureStore

    with FeatureStore(store_path) as store:
        X, y = store.features(split="train", dtype=np.float32), store.labels("train")
        Xt, yt = store.features(split="test", dtype=np.float32), store.labels("test")
    if subset is not None:
        rows = np.sort(np.random.default_rng(0).choice(len(y), size=min(len(y), subset), replace=False))
        X, y = X[rows], y[rows]
    return X, y, Xt, yt


def featx_search(data: tuple[np.ndarray, ...], classifier: str, jobs: int) -> dict:
    from featx.classify import ClassifierConfig, build_pipeline, search
    from featx.classify.search import _folds

    X, y, Xt, yt = data
    config = ClassifierConfig(classifier=classifier)
    preset = config.validate()
    folds, scheme = _folds(y, np.array(["train"] * len(y)), config.cv, config.seed)
    steps = config.steps(preset)
    t0 = time.perf_counter()
    result = search(build_pipeline(preset, preset.grid[0], steps), preset, preset.grid, X, y, folds, scheme, jobs)
    search_s = time.perf_counter() - t0
    final = build_pipeline(preset, result.best, steps)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final.fit(X, y)
    refit_s = time.perf_counter() - t0
    return {
        "what": f"featx {classifier} search ({scheme}, {len(preset.grid)} values)",
        "n": len(y),
        "dims": X.shape[1],
        "search_s": search_s,
        "refit_s": refit_s,
        "best": result.best,
        "test_accuracy": float((final.predict(Xt) == yt).mean()),
    }


def gridsearch_baseline(data: tuple[np.ndarray, ...], classifier: str, jobs: int) -> dict:
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from featx.classify import ClassifierConfig, build_pipeline

    X, y, Xt, yt = data
    config = ClassifierConfig(classifier=classifier)
    preset = config.validate()
    pipe = build_pipeline(preset, preset.grid[0], config.steps(preset))
    # The same seeded folds as featx's search (StratifiedKFold, shuffled, seed 0).
    grid = GridSearchCV(
        pipe,
        {f"clf__{preset.param}": list(preset.grid)},
        n_jobs=jobs,
        cv=StratifiedKFold(config.cv, shuffle=True, random_state=config.seed),
        refit=True,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid.fit(X, y)
    total = time.perf_counter() - t0
    return {
        "what": f"plain GridSearchCV {classifier} ({config.cv}-fold, {len(preset.grid)} values)",
        "n": len(y),
        "dims": X.shape[1],
        "search_s": total - grid.refit_time_,
        "refit_s": grid.refit_time_,
        "best": grid.best_params_[f"clf__{preset.param}"],
        "test_accuracy": float(grid.score(Xt, yt)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--classifier", default="logreg")
    parser.add_argument("--jobs", type=int, default=-1)
    parser.add_argument("--baseline", action="store_true", help="also time a plain GridSearchCV")
    parser.add_argument("--quick", action="store_true", help="5,000 seeded training images only")
    args = parser.parse_args()

    print(f"machine: {machine_line()}\n")
    print("| run | train images × dims | search s | refit s | chosen | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    data = load(args.store, 5000 if args.quick else None)
    runs = [featx_search] + ([gridsearch_baseline] if args.baseline else [])
    for run in runs:
        r = run(data, args.classifier, args.jobs)
        print(
            f"| {r['what']} | {r['n']} × {r['dims']} | {r['search_s']:.1f} | {r['refit_s']:.1f} | "
            f"{r['best']:g} | {r['test_accuracy']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
