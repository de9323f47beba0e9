"""Choose the classical presets' defaults by measurement: featx's search against a converged GridSearchCV.

Usage::

    python benchmarks/bench_classical.py prepare [--work DIR]      # extract the four stores once (Lite0)
    python benchmarks/bench_classical.py run [--work DIR] [--sets hymenoptera,digits,cifar5k,cifar-rot40] \
        [--classifiers svm,logreg] [--settings svm:l2:dual,logreg:standard] [--reference]
    python benchmarks/bench_classical.py STORE --classifier logreg [--baseline] [--quick]   # one store, defaults

The four sets (frozen ``featx:efficientnet_lite0`` penultimate features, 1280-d):

- ``hymenoptera``: ``../shared/data/hymenoptera`` (2 classes, its val folder is the test split);
- ``digits``: scikit-learn's 8×8 digits (10 classes, featx's seeded 20 % test split);
- ``cifar5k``: CIFAR-10, 500 train / 200 test images per class from its train / test folders;
- ``cifar-rot40``: a 40-class set built from CIFAR-10's test folder, class × rotation (0/90/180/270°),
  40 train / 20 test images per class.

For every set it prints one Markdown row per (classifier, preprocessing, solver setting): featx's search
time, the chosen value, whether every fit converged, and the test accuracy, beside a plain ``GridSearchCV``
on the same folds (a fixed 17-value grid 1e-4 … 1e4, half decades, converged: ``max_iter`` raised until
no ``ConvergenceWarning``, or marked). Run with nothing else heavy on the machine for stable timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HYMENOPTERA, SHARED_DATA, machine_line, table

SETS = ("hymenoptera", "digits", "cifar5k", "cifar-rot40")
REFERENCE_GRID = tuple(float(c) for c in np.logspace(-4, 4, 17))


# ------------------------------------------------------------------------------------------- prepare
def _cifar(work: Path) -> Path:
    root = work / "cifar10-jpeg"
    if not (root / "train").is_dir():
        with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(work, filter="data")
    return root


def _cifar_manifest(work: Path, train_per_class: int, test_per_class: int) -> Path:
    root = _cifar(work)
    rows = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            rows += [f"{p},{cls.name},{split}" for p in sorted(cls.glob("*.jpg"))[:per_class]]
    out = work / f"cifar-{train_per_class}-{test_per_class}.csv"
    out.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return out


def _rot40_manifest(work: Path, train_per_class: int = 40, test_per_class: int = 20) -> Path:
    from PIL import Image

    root = _cifar(work)
    target = work / "cifar-rot40"
    rows = []
    for cls in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.jpg"))
        for angle in (0, 90, 180, 270):
            # A different image slice per angle, so no photo appears under two labels.
            start = (angle // 90) * (train_per_class + test_per_class)
            chosen = files[start : start + train_per_class + test_per_class]
            for i, path in enumerate(chosen):
                out = target / f"{cls.name}-{angle}" / path.name.replace(".jpg", ".png")
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    Image.open(path).convert("RGB").rotate(angle).save(out)
                split = "train" if i < train_per_class else "test"
                rows.append(f"{out},{cls.name}-{angle},{split}")
    manifest = work / "cifar-rot40.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def store_path(work: Path, name: str) -> Path:
    return work / f"{name}.lite0.h5"


def prepare(work: Path, sets: list[str]) -> None:
    """Extract each set's store once (a cache hit afterwards)."""
    from featx.extract import extract

    sources = {
        "hymenoptera": lambda: HYMENOPTERA,
        "digits": lambda: "digits",
        "cifar5k": lambda: _cifar_manifest(work, 500, 200),
        "cifar-rot40": lambda: _rot40_manifest(work),
    }
    for name in sets:
        t0 = time.perf_counter()
        extract(sources[name](), out=store_path(work, name), progress=False)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- run
def load(path: Path, subset: int | None = None) -> tuple[np.ndarray, ...]:
    """Train (optionally ``subset`` seeded training rows) and test features and labels."""
    from featx.store import FeatureStore

    with FeatureStore(path) as store:
        X, y = store.features(split="train", dtype=np.float32), store.labels("train")
        Xt, yt = store.features(split="test", dtype=np.float32), store.labels("test")
    if subset is not None:
        rows = np.sort(np.random.default_rng(0).choice(len(y), size=min(len(y), subset), replace=False))
        X, y = X[rows], y[rows]
    return X, y, Xt, yt


def featx_run(data, classifier: str, preprocess: str, params: dict, jobs: int) -> dict:
    """featx's search + refit, as ``featx train`` runs them."""
    from featx.classify import ClassifierConfig
    from featx.classify.training import fit_in_memory

    X, y, Xt, yt = data
    config = ClassifierConfig(classifier=classifier, preprocess=(preprocess,), params=tuple(params.items()))
    t0 = time.perf_counter()
    fitted = fit_in_memory(X, y, np.array(["train"] * len(y)), config.validate(), config, n_jobs=jobs)
    total = time.perf_counter() - t0
    search = fitted.search
    return {
        "search_s": total - fitted.fit_seconds,
        "refit_s": fitted.fit_seconds,
        "best": fitted.value,
        "converged": all(p.get("converged", True) for p in search.curve) and fitted.refit["converged"] is not False,
        "fits": len(search.curve),
        "at_edge": search.at_edge,
        "test_accuracy": float((fitted.pipeline.predict(Xt) == yt).mean()),
    }


def reference_run(data, classifier: str, preprocess: str, params: dict, jobs: int) -> dict:
    """A plain ``GridSearchCV`` over the fixed 17-value grid, same folds, ``max_iter`` raised until converged."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from featx.classify import ClassifierConfig, build_pipeline

    X, y, Xt, yt = data
    config = ClassifierConfig(classifier=classifier, preprocess=(preprocess,))
    preset = config.validate()
    max_iter = 10_000 if classifier == "svm" else 5_000
    pipe = build_pipeline(preset, 1.0, config.steps(preset), params={**params, "max_iter": max_iter})
    grid = GridSearchCV(
        pipe,
        {f"clf__{preset.param}": list(REFERENCE_GRID)},
        n_jobs=jobs,
        cv=StratifiedKFold(config.cv, shuffle=True, random_state=config.seed),
        refit=True,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        grid.fit(X, y)
    total = time.perf_counter() - t0
    return {
        "search_s": total - grid.refit_time_,
        "refit_s": grid.refit_time_,
        "best": grid.best_params_[f"clf__{preset.param}"],
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "fits": len(REFERENCE_GRID),
        "at_edge": None,
        "test_accuracy": float(grid.score(Xt, yt)),
    }


SETTINGS = {
    "svm": [
        ("standard", {}),
        ("l2", {}),
        ("l2", {"dual": False}),
        ("standard", {"dual": False}),
    ],
    "logreg": [("standard", {}), ("l2", {})],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", help="prepare, run, or a labelled store (its preset defaults only)")
    parser.add_argument("--classifier", help="with a store: the classifier (default: svm and logreg)")
    parser.add_argument("--baseline", action="store_true", help="the same as --reference")
    parser.add_argument("--quick", action="store_true", help="with a store: 5,000 seeded training images only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featx_bench13"))
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--classifiers", default="svm,logreg")
    parser.add_argument("--jobs", type=int, default=-1)
    parser.add_argument("--reference", action="store_true", help="also run the GridSearchCV reference")
    parser.add_argument("--json", type=Path, help="append each row as a JSON line here")
    parser.add_argument("--settings", help="only these, e.g. svm:l2:primal,logreg:standard (default: all)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sets = args.sets.split(",")
    if args.what == "prepare":
        prepare(args.work, sets)
        return
    settings = SETTINGS
    if args.what != "run":  # one store, the presets' defaults (what run_all.py --classical-store runs)
        from featx.classify import PRESETS

        sets, args.reference = [args.what], args.reference or args.baseline
        args.classifiers = args.classifier or args.classifiers
        settings = {name: [(PRESETS[name].preprocess[0], {})] for name in args.classifiers.split(",")}
    print(f"machine: {machine_line()}\n")
    rows = []
    for name in sets:
        path = Path(name) if args.what != "run" else store_path(args.work, name)
        data = load(path, 5000 if args.quick else None)
        for classifier in args.classifiers.split(","):
            for preprocess, params in settings[classifier]:
                tag = f"{classifier}:{preprocess}:{'primal' if params.get('dual') is False else 'dual'}"
                if args.settings and not any(tag.startswith(t) for t in args.settings.split(",")):
                    continue
                runs = [("featx", featx_run)] + ([("GridSearchCV", reference_run)] if args.reference else [])
                for who, run in runs:
                    r = run(data, classifier, preprocess, params, args.jobs)
                    row = {"set": name, "n": len(data[1]), "who": who, "classifier": classifier}
                    row.update(preprocess=preprocess, params=params, **r)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with args.json.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                    rows.append(row)
    header = ["set", "n train", "run", "classifier", "preprocess", "solver", "search s", "refit s", "chosen"]
    print(table([*header, "converged", "test acc"], [_cells(r) for r in rows]))


def _cells(r: dict) -> list:
    solver = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "default"
    return [
        *(r["set"], r["n"], r["who"], r["classifier"], r["preprocess"], solver),
        *(f"{r['search_s']:.1f}", f"{r['refit_s']:.1f}", f"{r['best']:g}", r["converged"]),
        f"{r['test_accuracy']:.4f}",
    ]


if __name__ == "__main__":
    main()
