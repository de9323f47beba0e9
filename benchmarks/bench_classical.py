"""Choose the classical presets' defaults by measurement: featx's search against a converged GridSearchCV.

Usage::

    python benchmarks/bench_classical.py prepare [--work DIR]      # extract the four stores once (Lite0)
    python benchmarks/bench_classical.py run [--work DIR] [--sets hymenoptera,digits,cifar5k,cifar-rot40] \
        [--classifiers svm,logreg] [--settings svm:l2:dual,logreg:standard] [--reference] [--jobs 2]
    python benchmarks/bench_classical.py STORE --classifier logreg [--baseline] [--quick]   # one store, defaults

The four sets (frozen ``featx:efficientnet_lite0`` penultimate features, 1280-d), read under the default split
plan (:class:`featx.data.splits.SplitPlan`: split seed 0; val = 0.2 of each class of train, as the sources have
none; test = 0.2 of each class where the source has no test split):

- ``hymenoptera``: ``../shared/data/hymenoptera`` (2 classes; its val folder is the test split);
- ``digits``: scikit-learn's 8×8 digits (10 classes; test carved by the plan);
- ``cifar5k``: CIFAR-10, 500 train / 200 test images per class from its train / test folders;
- ``cifar-rot40``: a 40-class set built from CIFAR-10's test folder, class × rotation (0/90/180/270°),
  40 train / 20 test images per class.

The protocol is featx's (``SELECTION_RULE``): the hyper-parameter is chosen on the val split (one fold,
``scheme == "validation split"``), the final model is fit on train only and scored once on test. For every set
it prints one Markdown row per (classifier, preprocessing, solver setting): featx's search time, the chosen
value, whether every fit converged, and the test accuracy, beside the reference: a plain ``GridSearchCV`` on
the same train -> val split (``PredefinedSplit``), a fixed 17-value grid 1e-4 … 1e4 in half decades,
converged (each point's iterations recorded; ``max_iter`` 10,000 for svm and 5,000 for logreg, raised ×10
once for the points that hit it; what still has not converged is marked), its best value fit on train only
with the same preprocessing and scored on the same test images. Run with nothing else heavy on the machine
for stable timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HYMENOPTERA, cifar_folder, cifar_manifest, machine_line, table

SETS = ("hymenoptera", "digits", "cifar5k", "cifar-rot40")
REFERENCE_GRID = tuple(float(c) for c in np.logspace(-4, 4, 17))


# ------------------------------------------------------------------------------------------- prepare
def _rot40_manifest(work: Path, train_per_class: int = 40, test_per_class: int = 20) -> Path:
    from PIL import Image

    root = cifar_folder(work)
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
        "cifar5k": lambda: cifar_manifest(work, 500, 200),
        "cifar-rot40": lambda: _rot40_manifest(work),
    }
    for name in sets:
        t0 = time.perf_counter()
        extract(sources[name](), out=store_path(work, name), progress=False)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- run
def load(path: Path, subset: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "val", "test"}: (X, y)`` under the default split plan, as ``featx train`` reads the store.

    With ``subset``, a seeded ``subset`` of the train+val rows is kept (each row keeps its split); test is whole.
    """
    from featx.data.splits import SplitPlan
    from featx.store import FeatureStore

    with FeatureStore(path, SplitPlan()) as store:
        data = {s: (store.features(split=s, dtype=np.float32), store.labels(s)) for s in ("train", "val", "test")}
    if subset is not None:
        X, y, splits = _labelled(data)
        rows = np.sort(np.random.default_rng(0).choice(len(y), size=min(len(y), subset), replace=False))
        data.update({s: (X[rows][splits[rows] == s], y[rows][splits[rows] == s]) for s in ("train", "val")})
    for s in ("train", "val", "test"):
        keep = data[s][1] >= 0  # unlabeled rows never train, select or score
        data[s] = (data[s][0][keep], data[s][1][keep])
    if not len(data["val"][1]) or not len(data["test"][1]):
        raise SystemExit(f"{path}: the split plan left no labelled val or test rows; this benchmark needs both")
    return data


def _labelled(data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train and val rows stacked (train first), with each row's split: what ``featx train`` searches on."""
    (Xtr, ytr), (Xva, yva) = data["train"], data["val"]
    splits = np.array(["train"] * len(ytr) + ["val"] * len(yva))
    return np.concatenate([Xtr, Xva]), np.concatenate([ytr, yva]), splits


def sizes(data: dict) -> str:
    return " / ".join(f"{len(data[s][1]):,}" for s in ("train", "val", "test"))


def featx_run(data, classifier: str, preprocess: str, params: dict, jobs: int) -> dict:
    """featx's search on val + refit on train, as ``featx train`` runs them (:func:`fit_in_memory`)."""
    from featx.classify import ClassifierConfig
    from featx.classify.training import fit_in_memory

    X, y, splits = _labelled(data)
    Xt, yt = data["test"]
    config = ClassifierConfig(classifier=classifier, preprocess=(preprocess,), params=tuple(params.items()))
    fitted = fit_in_memory(X, y, splits, config.preset, config, n_jobs=jobs)
    search = fitted.search
    assert search.scheme == "validation split", search.scheme  # one fold: train -> val
    assert fitted.trained_on["splits"] == ["train"] and fitted.trained_on["n"] == len(data["train"][1])
    points = search.curve + search.refined
    return {
        "search_s": search.seconds,
        "refit_s": fitted.fit_seconds,
        "best": fitted.value,
        "val_accuracy": max(p["mean"] for p in points),
        "val_curve": {f"{p['value']:.3g}": p["mean"] for p in sorted(points, key=lambda p: p["value"])},
        "converged": search.converged and fitted.refit.get("converged") is not False,
        "search_converged": search.converged,
        "refit_converged": fitted.refit.get("converged"),
        "refit_max_iter": fitted.refit.get("max_iter"),
        "unconverged": sorted(p["value"] for p in points if p.get("converged") is False),
        "fits": len(points),
        "at_edge": search.at_edge,
        "widened": search.widened,
        "stopped_early": search.stopped_early,
        "test_accuracy": float((fitted.pipeline.predict(Xt) == yt).mean()),
    }


#: The reference's ``max_iter`` at first (svm; logreg), raised ×10 at most ``REFERENCE_RAISES`` times for the
#: grid points (and the final fit) that did not converge; what still has not is marked.
REFERENCE_MAX_ITER = {"svm": 10_000, "logreg": 5_000}
REFERENCE_RAISES = 1


def _n_iter(estimator, X, y) -> float:
    """A "score" that records the fit's iterations (so each grid point's convergence is known)."""
    return float(np.max(estimator.steps[-1][1].n_iter_))


def _fit_score(model, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(*train)
    return float((model.predict(test[0]) == test[1]).mean())


def reference_run(data, classifier: str, preprocess: str, params: dict, jobs: int) -> dict:
    """A plain ``GridSearchCV`` over the fixed 17-value grid on the same one train -> val split
    (``PredefinedSplit``), ``max_iter`` raised until converged; the best value refit on train only."""
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    from featx.classify import ClassifierConfig, build_pipeline

    X, y, splits = _labelled(data)
    Xt, yt = data["test"]
    config = ClassifierConfig(classifier=classifier, preprocess=(preprocess,))
    preset = config.preset
    key = f"clf__{preset.param}"
    fold = PredefinedSplit(np.where(splits == "val", 0, -1))  # fit on the train rows, score on the val rows

    def pipe(max_iter: int):
        return build_pipeline(preset, 1.0, config.steps(preset), config.seed, params={**params, "max_iter": max_iter})

    scores: dict[float, float] = {}
    converged: dict[float, bool] = {}
    todo, max_iter = list(REFERENCE_GRID), REFERENCE_MAX_ITER[classifier]
    passes, fits, search_s, first_pass_s = 0, 0, 0.0, 0.0
    while todo and passes <= REFERENCE_RAISES:
        grid = GridSearchCV(
            pipe(max_iter),
            {key: todo},
            scoring={"accuracy": "accuracy", "n_iter": _n_iter},
            cv=fold,
            refit=False,
            n_jobs=jobs,
        )
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded per point from n_iter_ instead
            grid.fit(X, y)
        search_s += time.perf_counter() - t0
        fits += len(todo)
        first_pass_s = first_pass_s or search_s
        res = grid.cv_results_
        columns = (res[f"param_{key}"], res["mean_test_accuracy"], res["mean_test_n_iter"])
        for value, acc, n_iter in zip(*columns, strict=True):
            scores[float(value)], converged[float(value)] = float(acc), n_iter < max_iter
        todo = [v for v in todo if not converged[v]]
        passes += 1
        if todo:
            max_iter *= 10
    values = sorted(scores)
    best = values[int(np.argmax([scores[v] for v in values]))]  # ties: the smaller value, as featx
    final_iter = REFERENCE_MAX_ITER[classifier]
    for _ in range(REFERENCE_RAISES + 1):
        model = pipe(final_iter).set_params(**{key: best})
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(*data["train"])  # the selection rule: fit on train only
        refit_s = time.perf_counter() - t0
        refit_converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if refit_converged:
            break
        final_iter *= 10
    # Diagnosis only, never used to choose: every grid value fit on train and scored on test (the test accuracy
    # the val split could have picked), so a gap between two choices can be told from val noise.
    test_curve = dict(
        zip(
            values,
            Parallel(n_jobs=jobs)(
                delayed(_fit_score)(pipe(max_iter).set_params(**{key: v}), data["train"], data["test"]) for v in values
            ),
            strict=True,
        )
    )
    return {
        "search_s": search_s,
        "first_pass_s": first_pass_s,
        "passes": passes,
        "max_iter": max_iter,
        "refit_s": refit_s,
        "best": best,
        "val_accuracy": scores[best],
        "converged": all(converged.values()) and refit_converged,
        "search_converged": all(converged.values()),
        "refit_converged": refit_converged,
        "refit_max_iter": final_iter,
        "unconverged": [v for v in values if not converged[v]],
        "fits": fits,
        "at_edge": best in (values[0], values[-1]),
        "test_accuracy": float((model.predict(Xt) == yt).mean()),
        "val_curve": {f"{v:g}": scores[v] for v in values},
        "test_curve": {f"{v:g}": test_curve[v] for v in values},
        "grid_best_test_accuracy": max(test_curve.values()),
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
    parser.add_argument("--quick", action="store_true", help="with a store: 5,000 seeded train+val images only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featx_bench13"))
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--classifiers", default="svm,logreg")
    parser.add_argument("--jobs", type=int, default=-1, help="parallel jobs of both searches (-1: all cores)")
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
    print(f"machine: {machine_line()}\n", flush=True)
    rows = []
    for name in sets:
        path = Path(name) if args.what != "run" else store_path(args.work, name)
        data = load(path, 5000 if args.quick else None)
        print(f"{name}: train / val / test {sizes(data)}", flush=True)
        for classifier in args.classifiers.split(","):
            for preprocess, params in settings[classifier]:
                tag = f"{classifier}:{preprocess}:{'primal' if params.get('dual') is False else 'dual'}"
                if args.settings and not any(tag.startswith(t) for t in args.settings.split(",")):
                    continue
                row = {"set": name, "sizes": sizes(data), "classifier": classifier}
                row.update(preprocess=preprocess, params=params)
                runs = [("featx", featx_run)] + ([("reference", reference_run)] if args.reference else [])
                for who, run in runs:
                    row[who] = run(data, classifier, preprocess, params, args.jobs)
                    print(json.dumps({"set": name, "tag": tag, "who": who, **row[who]}), flush=True)
                if args.json:
                    with args.json.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                rows.append(row)
    header = ["set", "train / val / test", "classifier", "preprocess", "solver", "featx search s", "chosen"]
    header += ["converged", "test acc"]
    if args.reference:
        header += ["reference search s", "reference C", "reference converged", "reference test acc", "|Δ| pt"]
        header += ["grid's best test acc"]
    print(table(header, [_cells(r, args.reference) for r in rows]))


def _yes(r: dict) -> str:
    if r["converged"]:
        return "yes"
    what = [f"{v:g}" for v in r["unconverged"]]
    if r["refit_converged"] is False:
        what.append(f"final fit at max_iter {r['refit_max_iter']}")
    return "no: " + ", ".join(what)


def _cells(r: dict, reference: bool) -> list:
    solver = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "default"
    f = r["featx"]
    cells = [r["set"], r["sizes"], r["classifier"], r["preprocess"], solver, f"{f['search_s']:.1f}", f"{f['best']:.3g}"]
    cells += [_yes(f), f"{f['test_accuracy']:.4f}"]
    if reference:
        g = r["reference"]
        delta = 100 * abs(f["test_accuracy"] - g["test_accuracy"])
        cells += [f"{g['search_s']:.1f}", f"{g['best']:.3g}", _yes(g), f"{g['test_accuracy']:.4f}", f"{delta:.1f}"]
        cells += [f"{g['grid_best_test_accuracy']:.4f}"]
    return cells


if __name__ == "__main__":
    main()
