"""g on cached f(x): scikit-learn classifiers trained on a feature store, searched, evaluated and saved safely.

The protocol follows the linear-evaluation literature (VISSL's LinearSVC sweep; Kornblith et al. 2019's
logistic regression on fixed features): the regularisation strength is chosen on the training data only —
on the store's validation split when it has one, else by stratified k-fold cross-validation — over a log
grid, in parallel, with warm starts along the grid where the solver allows; the model is then refit on
train (+ val) and scored once on the test split.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline

from featx._env import library_versions
from featx._errors import SpecMismatchError, UnknownNameError, unknown
from featx._io import atomic_write
from featx.metrics import evaluate
from featx.spec import DEFAULT_MAX_PIXELS, canonical_json, spec_differences, with_defaults
from featx.store import FeatureStore

__all__ = [
    "PRESETS",
    "ClassifierConfig",
    "Preset",
    "TrainedModel",
    "build_pipeline",
    "check_compatible",
    "few_shot_curve",
    "load_model",
    "parse_preprocess",
    "predict_images",
    "register_classifier",
    "search",
    "train",
]

log = logging.getLogger(__name__)

MODEL_FORMAT = "featx.model"
MODEL_FORMAT_VERSION = 1
RESULTS_SCHEMA = "featx.results/1"
# sklearn types that skops does not trust by default but that the presets need (k-NN's search trees).
_SAFE_EXTRA_TYPES = (
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
)


# ------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A named classifier: how to build it, and which hyper-parameter to search over which grid.

    Parameters
    ----------
    name : str
    param : str
        The searched hyper-parameter (``C``, ``alpha``, ``n_neighbors``).
    grid : tuple of float
        Default search grid, in the order searched (warm starts go along it).
    build : callable
        ``build(value, seed, class_weight, **extra) -> estimator``.
    warm_start : bool, default=False
        The estimator supports ``warm_start=True`` along the grid.
    supports_class_weight : bool, default=True
    description : str, default=""
    preprocess : tuple of str, default=("standard",)
        Preprocessing used when the configuration names none.
    """

    name: str
    param: str
    grid: tuple[float, ...]
    build: Callable[..., BaseEstimator]
    warm_start: bool = False
    supports_class_weight: bool = True
    description: str = ""
    preprocess: tuple[str, ...] = ("standard",)


PRESETS: dict[str, Preset] = {}


def register_classifier(preset: Preset) -> None:
    """Register a classifier preset; a name registered twice is a ``ValueError``."""
    if preset.name in PRESETS:
        raise ValueError(f"classifier preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset


def _svm(C, seed, class_weight, **extra):
    from sklearn.svm import LinearSVC

    # The dual solver always: sklearn's "auto" picks the primal when n > D, which on standardised CNN features
    # took 50x longer at moderate C (digits / EfficientNet-Lite0, C=0.1: 110 s against 2 s).
    return LinearSVC(
        C=C, dual=True, max_iter=extra.pop("max_iter", 5000), random_state=seed, class_weight=class_weight, **extra
    )


def _logreg(C, seed, class_weight, **extra):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C, max_iter=extra.pop("max_iter", 1000), random_state=seed, class_weight=class_weight, **extra
    )


def _sgd(alpha, seed, class_weight, **extra):
    from sklearn.linear_model import SGDClassifier

    return SGDClassifier(
        alpha=alpha,
        loss=extra.pop("loss", "hinge"),
        max_iter=extra.pop("max_iter", 50),
        tol=extra.pop("tol", 1e-4),
        random_state=seed,
        class_weight=class_weight,
        **extra,
    )


def _ridge(alpha, seed, class_weight, **extra):
    from sklearn.linear_model import RidgeClassifier

    return RidgeClassifier(alpha=alpha, class_weight=class_weight, **extra)


def _knn(n_neighbors, seed, class_weight, **extra):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=int(n_neighbors), weights=extra.pop("weights", "distance"), **extra)


_LOG_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))
register_classifier(Preset("svm", "C", _LOG_GRID, _svm, description="LinearSVC (squared hinge, one-vs-rest)"))
register_classifier(
    Preset(
        "logreg",
        "C",
        _LOG_GRID,
        _logreg,
        warm_start=True,
        description="multinomial logistic regression (lbfgs), warm-started along the C grid",
    )
)
register_classifier(
    Preset(
        "sgd",
        "alpha",
        tuple(float(a) for a in np.logspace(-6, -1, 6)),
        _sgd,
        warm_start=True,
        description="SGDClassifier (hinge; loss=log_loss via --param); out-of-core with --out-of-core",
    )
)
register_classifier(
    Preset("ridge", "alpha", tuple(float(a) for a in np.logspace(-2, 5, 8)), _ridge, description="RidgeClassifier")
)
register_classifier(
    Preset(
        "knn",
        "n_neighbors",
        (1.0, 3.0, 5.0, 10.0, 20.0),
        _knn,
        supports_class_weight=False,
        description="k-nearest neighbours (distance-weighted), a no-training baseline",
        preprocess=("l2",),
    )
)


def _import_path_preset(path: str) -> Preset:
    module_name, _, cls_name = path.rpartition(".")
    if not module_name:
        raise unknown("classifier", path, PRESETS, "Use a preset or an import path like sklearn.svm.SVC.")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise UnknownNameError(f"classifier {path!r} cannot be imported ({exc}); check the import path") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator) and hasattr(cls, "predict")):
        raise ValueError(f"{path} is not a scikit-learn classifier class")
    params = cls().get_params()
    param = "C" if "C" in params else "alpha" if "alpha" in params else ""

    def build(value, seed, class_weight, **extra):
        kwargs = dict(extra)
        if param and value is not None:
            kwargs[param] = value
        if "random_state" in params:
            kwargs.setdefault("random_state", seed)
        if class_weight is not None:
            kwargs["class_weight"] = class_weight
        return cls(**kwargs)

    return Preset(path, param, _LOG_GRID if param else (), build, supports_class_weight="class_weight" in params)


def get_preset(name: str) -> Preset:
    """A registered preset, or a preset wrapping a classifier given by import path (``sklearn.svm.SVC``)."""
    if name in PRESETS:
        return PRESETS[name]
    if "." in name:
        return _import_path_preset(name)
    raise unknown("classifier", name, PRESETS, f"Presets are {', '.join(PRESETS)}; or give an import path.")


# ------------------------------------------------------------------------------------- preprocessing
def parse_preprocess(text: str | Sequence[str] | None) -> list[str]:
    """``"l2,pca:128"`` → ``["l2", "pca:128"]``; validates each step (``l2``, ``standard``, ``pca:K``, ``none``)."""
    if text is None:
        return []
    steps = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    out = []
    for step in steps:
        if step == "none":
            continue
        if step in ("l2", "standard") or re.fullmatch(r"pca:[1-9]\d*", step):
            out.append(step)
        else:
            raise ValueError(
                f"preprocessing step {step!r}: use l2, standard, pca:K (e.g. pca:256) or none, comma-separated"
            )
    return out


def build_pipeline(
    preset: Preset,
    value: float | None,
    preprocess: Sequence[str],
    seed: int = 0,
    class_weight: str | None = None,
    params: dict[str, Any] | None = None,
) -> Pipeline:
    """Preprocessing steps followed by the preset's estimator with its hyper-parameter set to ``value``."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps: list[tuple[str, Any]] = []
    for step in preprocess:
        if step == "l2":
            steps.append(("l2", Normalizer()))
        elif step == "standard":
            steps.append(("standard", StandardScaler()))
        else:
            steps.append(("pca", PCA(n_components=int(step.split(":")[1]), random_state=seed)))
    if class_weight is not None and not preset.supports_class_weight:
        raise ValueError(f"classifier {preset.name} has no class_weight; drop --class-weight")
    steps.append(("clf", preset.build(value, seed, class_weight, **dict(params or {}))))
    return Pipeline(steps)


# -------------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """The outcome of a hyper-parameter search."""

    param: str
    scheme: str
    best: float | None
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "scheme": self.scheme,
            "best": self.best,
            "curve": self.curve,
            "seconds": round(self.seconds, 3),
        }


def _fit_quietly(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _score_fold(
    pipeline: Pipeline, param: str, values: Sequence[float], warm: bool, X, y, train_idx, val_idx, scoring: str
) -> list[float]:
    """Scores of one fold for each value; preprocessing fit once, the estimator warm-started along the values."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    score_fn = balanced_accuracy_score if scoring == "balanced_accuracy" else accuracy_score
    pre = Pipeline(pipeline.steps[:-1]) if len(pipeline.steps) > 1 else None
    Xtr, Xva = X[train_idx], X[val_idx]
    if pre is not None:
        pre = clone(pre).fit(Xtr, y[train_idx])
        Xtr, Xva = pre.transform(Xtr), pre.transform(Xva)
    est = clone(pipeline.steps[-1][1])
    if warm:
        est.set_params(warm_start=True)
    scores = []
    for value in values:
        if not warm:
            est = clone(est)
        if param == "n_neighbors":  # a fold may hold fewer images than the largest k
            value = min(int(value), len(train_idx))
        est.set_params(**{param: value})
        _fit_quietly(est, Xtr, y[train_idx])
        scores.append(float(score_fn(y[val_idx], est.predict(Xva))))
    return scores


def search(
    pipeline: Pipeline,
    preset: Preset,
    grid: Sequence[float],
    X: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    scheme: str,
    n_jobs: int = -1,
    scoring: str = "accuracy",
) -> SearchResult:
    """Score every grid value on every fold in parallel; the best mean wins (ties: the first in grid order).

    Warm-started presets run one task per fold along the whole grid; the others one task per (fold, value).
    """
    t0 = time.perf_counter()
    grid = [float(v) for v in grid]
    if preset.warm_start:
        tasks = [(fold, list(range(len(grid)))) for fold in range(len(folds))]
    else:
        tasks = [(fold, [i]) for fold in range(len(folds)) for i in range(len(grid))]
    results = Parallel(n_jobs=n_jobs)(
        delayed(_score_fold)(
            pipeline,
            preset.param,
            [grid[i] for i in idx],
            preset.warm_start,
            X,
            y,
            folds[fold][0],
            folds[fold][1],
            scoring,
        )
        for fold, idx in tasks
    )
    table = np.full((len(folds), len(grid)), np.nan)
    for (fold, idx), scores in zip(tasks, results, strict=True):
        table[fold, idx] = scores
    means, stds = table.mean(axis=0), table.std(axis=0)
    best_i = int(np.argmax(means))
    curve = [
        {"value": v, "mean": float(m), "std": float(s), "folds": [float(x) for x in table[:, i]]}
        for i, (v, m, s) in enumerate(zip(grid, means, stds, strict=True))
    ]
    if len(grid) > 1 and best_i in (0, len(grid) - 1):
        log.warning(
            "best %s=%g is at the edge of the grid %s; consider widening it with --grid",
            preset.param,
            grid[best_i],
            grid,
        )
    return SearchResult(preset.param, scheme, grid[best_i], curve, time.perf_counter() - t0)


def _folds(y: np.ndarray, splits: np.ndarray, cv: int, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """The validation split when there is one, else stratified k-fold on train (k lowered for tiny classes)."""
    train_idx, val_idx = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    if len(val_idx):
        return [(train_idx, val_idx)], "validation split"
    counts = np.bincount(y[train_idx])
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise ValueError(
            "a class has a single training image, so its C cannot be chosen by cross-validation; pass a fixed "
            "value (e.g. --C 1.0) or add images"
        )
    k = min(cv, smallest)
    if k < cv:
        log.warning("the smallest class has %d training images: using %d-fold cross-validation", smallest, k)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train_idx[a], train_idx[b]) for a, b in skf.split(train_idx, y[train_idx])], f"{k}-fold stratified CV"


# --------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that defines one classifier cell (and its cache identity in pipelines).

    Parameters
    ----------
    classifier : str, default="svm"
        A preset name or an import path.
    value : float or "auto", default="auto"
        The searched hyper-parameter (C, alpha, k); ``auto`` searches ``grid``.
    grid : tuple of float, optional
        Overrides the preset's grid.
    preprocess : tuple of str, optional
        Steps before the estimator; by default the preset's (``standard``; ``l2`` for knn, i.e. cosine).
    cv : int, default=5
    class_weight : {None, "balanced"}
    scoring : {"accuracy", "balanced_accuracy"}
    params : dict
        Extra keyword parameters of the estimator.
    layer : str, optional
        The store layer (its first by default).
    seed : int, default=0
    out_of_core : bool, default=False
        ``sgd`` only: stream the store in shuffled blocks through ``partial_fit`` (bounded memory); the
        hyper-parameter is chosen on the val split, or on a seeded 10 % hold-out of train.
    """

    classifier: str = "svm"
    value: float | str = "auto"
    grid: tuple[float, ...] | None = None
    preprocess: tuple[str, ...] | None = None
    cv: int = 5
    class_weight: str | None = None
    scoring: str = "accuracy"
    params: tuple[tuple[str, Any], ...] = ()
    layer: str | None = None
    seed: int = 0
    out_of_core: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "classifier": self.classifier,
            "value": self.value,
            "grid": list(self.grid) if self.grid else None,
            "preprocess": None if self.preprocess is None else list(self.preprocess),
            "cv": self.cv,
            "class_weight": self.class_weight,
            "scoring": self.scoring,
            "params": dict(self.params),
            "layer": self.layer,
            "seed": self.seed,
            "out_of_core": self.out_of_core,
        }

    def steps(self, preset: Preset) -> list[str]:
        """The preprocessing steps in force: the configured ones, else the preset's default."""
        return parse_preprocess(self.preprocess if self.preprocess is not None else preset.preprocess)

    def validate(self) -> Preset:
        """Check every field (before any data is read); returns the preset."""
        preset = get_preset(self.classifier)
        self.steps(preset)
        if self.cv < 2:
            raise ValueError(f"cv must be at least 2 folds, got {self.cv}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight {self.class_weight!r}: use balanced or leave it out")
        if self.scoring not in ("accuracy", "balanced_accuracy"):
            raise ValueError(f"scoring {self.scoring!r}: use accuracy or balanced_accuracy")
        if self.value != "auto":
            if not preset.param:
                raise ValueError(f"{preset.name} has no C or alpha to set")
            if not isinstance(self.value, int | float) or self.value <= 0:
                raise ValueError(f"{preset.param} must be a positive number or 'auto', got {self.value!r}")
        elif not (self.grid or preset.grid):
            pass  # nothing to search: the estimator's defaults are used
        if self.grid is not None and (not self.grid or min(self.grid) <= 0):
            raise ValueError("the grid must hold positive values")
        if self.out_of_core:
            if preset.name != "sgd":
                raise ValueError("out-of-core training streams store chunks through partial_fit: use --classifier sgd")
            if self.class_weight is not None:
                raise ValueError("out-of-core training cannot weight classes (partial_fit has no class_weight)")
            if set(self.steps(preset)) - {"l2", "standard"}:
                raise ValueError("out-of-core training supports the l2 and standard preprocessing steps only")
        if self.class_weight and not preset.supports_class_weight:
            raise ValueError(f"classifier {preset.name} has no class_weight; drop --class-weight")
        return preset


@dataclass
class TrainedModel:
    """A fitted pipeline with everything needed to apply it safely later."""

    pipeline: Pipeline
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def layer(self) -> str:
        return self.meta["layer"]

    def scores(self, X: np.ndarray) -> np.ndarray | None:
        """Class scores: probabilities when the estimator has them, else decision values."""
        for method in ("predict_proba", "decision_function"):
            if hasattr(self.pipeline, method):
                try:
                    s = getattr(self.pipeline, method)(X)
                except AttributeError:
                    continue
                s = np.asarray(s)
                if s.ndim == 1:  # binary decision_function: one column for the positive class
                    s = np.stack([-s, s], axis=1)
                return _expand_scores(s, self.pipeline.classes_, len(self.class_names))
        return None

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(X)

    def save(self, path: str | Path) -> Path:
        """Write the model as a skops file (no pickle): the pipeline plus its metadata."""
        import skops.io as sio

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "meta": canonical_json(self.meta),
            "pipeline": self.pipeline,
        }
        return atomic_write(path, lambda fh: fh.write(sio.dumps(content)))


def _expand_scores(scores: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores for the fitted classes placed into columns of every class (absent classes get -inf)."""
    if scores.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return scores
    # Classes the model never saw rank below every seen class (finite, so top-k metrics accept them).
    floor = scores.min(axis=1, keepdims=True) - 1.0
    full = np.repeat(floor, n_classes, axis=1)
    full[:, classes] = scores
    return full


def load_model(path: str | Path, trust: bool = False) -> TrainedModel:
    """Load a model file without running code from it.

    Only types skops trusts (scikit-learn, numpy, scipy) plus k-NN's search trees are loaded; anything else
    needs ``trust=True`` (``--trust``), to be given only for files from people you trust.
    """
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    try:
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in _SAFE_EXTRA_TYPES]
    except Exception as exc:
        raise ValueError(
            f"{path} is not a featx model file (expected a skops file written by `featx train`): {exc}"
        ) from None
    if untrusted and not trust:
        raise ValueError(
            f"{path} contains types that could run code when loaded: {', '.join(untrusted)}. Load it only if you "
            "trust its author, with --trust (trust=True)"
        )
    obj = sio.load(path, trusted=list(_SAFE_EXTRA_TYPES) + untrusted)
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is a skops file but not a featx model")
    if int(obj.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer featx (model format {obj['format_version']}); upgrade featx")
    return TrainedModel(obj["pipeline"], json.loads(obj["meta"]))


def check_compatible(model: TrainedModel, store: FeatureStore) -> None:
    """Refuse features made differently from those the model was trained on, naming the fields that differ."""
    trained = model.meta["store_spec"]
    layer = model.layer
    diffs = spec_differences(
        {k: v for k, v in with_defaults(trained).items() if k != "layers"},
        {k: v for k, v in with_defaults(store.spec.to_dict()).items() if k != "layers"},
    )
    if layer not in store.layers:
        diffs.append(f"layer: the model needs {layer!r}, the store has {list(store.layers)}")
    if diffs:
        raise SpecMismatchError(
            f"the model was trained on features made differently from those in {store.path}; differing fields: "
            f"{'; '.join(diffs)}. Extract the images with the model's spec (`featx info` shows both)"
        )


def _fit_timed(pipeline: Pipeline, X, y) -> float:
    t0 = time.perf_counter()
    _fit_quietly(pipeline, X, y)
    return time.perf_counter() - t0


def _labelled_rows(store: FeatureStore, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and split names of the labelled train/val rows."""
    Xs, ys, splits = [], [], []
    for split in ("train", "val"):
        if store.splits.get(split):
            Xs.append(store.features(layer, split=split, dtype=np.float32))
            ys.append(store.labels(split))
            splits += [split] * len(ys[-1])
    if not Xs:
        raise ValueError(f"{store.path} has no labelled training images")
    return np.concatenate(Xs), np.concatenate(ys), np.array(splits)


def train(
    store: FeatureStore | str | Path,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    n_jobs: int = -1,
    out_dir: str | Path | None = None,
    shots: Sequence[int | str] | None = None,
    draws: int = 5,
    n_bootstrap: int = 1000,
    scheduler: str | None = None,
) -> tuple[TrainedModel, dict[str, Any]]:
    """Search, refit and evaluate one classifier on a store; optionally write ``model.skops`` and ``results.json``.

    Parameters
    ----------
    store : FeatureStore or path
    config : ClassifierConfig
    n_jobs : int, default=-1
        Parallel jobs for the search (-1: all cores).
    out_dir : str or Path, optional
        Where to write ``model.skops`` and ``results.json``.
    shots : sequence of int or "all", optional
        Also compute a learning curve: k training images per class (several seeded draws).
    draws : int, default=5
    n_bootstrap : int, default=1000
    scheduler : str, optional
        Address of a Dask scheduler (``tcp://HOST:8786``) to run the search's folds on, through joblib's
        Dask backend (see :func:`featx.cluster.scheduler`); the results are the same as a local run's.
        Needs ``pip install 'featx[dask]'``.

    Returns
    -------
    (TrainedModel, dict)
        The model and the results (the ``results.json`` content; test metrics under ``"test"``).
    """
    preset = config.validate()
    if scheduler is not None and config.out_of_core:
        raise ValueError("out-of-core training streams the store on this machine; drop --scheduler or out-of-core")
    from featx.cluster import scheduler as dask_scheduler

    with dask_scheduler(scheduler):  # connect first: a bad address fails before the store is read
        owns = not isinstance(store, FeatureStore)
        fs = FeatureStore(store) if owns else store
        try:
            layer = config.layer or fs.layers[0]
            if layer not in fs.layers:
                raise unknown("layer of this store", layer, fs.layers, f"It holds: {', '.join(fs.layers)}.")
            preprocess = config.steps(preset)
            if config.out_of_core:
                if shots:
                    raise ValueError("learning curves (shots) need the features in memory; drop out-of-core or shots")
                pipeline, value, search_result, fit_seconds, trained_on = _train_out_of_core(
                    fs, layer, preset, config, preprocess
                )
            else:
                pipeline, value, search_result, fit_seconds, trained_on = _train_in_memory(
                    fs, layer, preset, config, preprocess, n_jobs
                )
            return _finish_training(
                fs,
                config,
                preset,
                layer,
                pipeline,
                value,
                search_result,
                fit_seconds,
                trained_on,
                n_bootstrap=n_bootstrap,
                out_dir=out_dir,
                shots=shots,
                draws=draws,
            )
        finally:
            if owns:
                fs.close()


def _train_in_memory(
    fs: FeatureStore, layer: str, preset: Preset, config: ClassifierConfig, preprocess: Sequence[str], n_jobs: int
):
    """Search (unless the value is fixed) and refit on the features held in memory."""
    X, y, splits = _labelled_rows(fs, layer)
    if len(np.unique(y)) < 2:
        raise ValueError(f"{fs.path} has a single class in its training data; a classifier needs two or more")
    params = dict(config.params)
    value = None if config.value == "auto" else float(config.value)
    search_result = None
    if value is None and preset.param:
        grid = config.grid or preset.grid
        folds, scheme = _folds(y, splits, config.cv, config.seed)
        base = build_pipeline(preset, grid[0], preprocess, config.seed, config.class_weight, params)
        search_result = search(base, preset, grid, X, y, folds, scheme, n_jobs, config.scoring)
        value = search_result.best
        log.info("%s: chose %s=%g (%s, %.1f s)", preset.name, preset.param, value, scheme, search_result.seconds)
    pipeline = build_pipeline(preset, value, preprocess, config.seed, config.class_weight, params)
    fit_seconds = _fit_timed(pipeline, X, y)
    trained_on = {"splits": sorted(set(splits.tolist())), "n": len(y)}
    return pipeline, value, search_result, fit_seconds, trained_on


def _finish_training(
    fs: FeatureStore,
    config: ClassifierConfig,
    preset: Preset,
    layer: str,
    pipeline: Pipeline,
    value: float | None,
    search_result: SearchResult | None,
    fit_seconds: float,
    trained_on: dict[str, Any],
    *,
    n_bootstrap: int,
    out_dir: str | Path | None,
    shots: Sequence[int | str] | None,
    draws: int,
) -> tuple[TrainedModel, dict[str, Any]]:
    """Wrap a fitted pipeline with its metadata, evaluate it, and write the model and results."""
    meta = {
        "featx_version": library_versions()["featx"],
        "store_spec": fs.spec.to_dict(),
        "store_key": fs.key,
        "manifest_fingerprint": fs.attrs.get("manifest_fingerprint"),
        "layer": layer,
        "class_names": fs.class_names,
        "classifier": {
            **config.to_dict(),
            "layer": layer,
            "preset": preset.name,
            "preprocess": config.steps(preset),
            "param": preset.param,
            "chosen": value,
        },
        "trained_on": trained_on,
        "versions": library_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    model = TrainedModel(pipeline, meta)
    results = {
        "schema": RESULTS_SCHEMA,
        "kind": "classifier",
        "method": f"{preset.name} · {fs.spec.backbone.split(':', 1)[-1]} · {layer}",
        "store": {
            "path": str(fs.path),
            "key": fs.key,
            "manifest_fingerprint": meta["manifest_fingerprint"],
            "spec": fs.spec.to_dict(),
            "stats": fs.info()["stats"],
        },
        "classifier": meta["classifier"],
        "search": search_result.to_dict() if search_result else None,
        "train": {"n": trained_on["n"], "fit_seconds": round(fit_seconds, 4)},
        "test": evaluate_model(model, fs, n_bootstrap=n_bootstrap, seed=config.seed) if fs.splits.get("test") else None,
        "versions": meta["versions"],
        "created_at": meta["created_at"],
    }
    if shots:
        preprocess = config.steps(preset)
        results["few_shot"] = few_shot_curve(fs, preset, value, preprocess, config, shots, draws, layer)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save(out / "model.skops")
        write_results(out / "results.json", results)
    return model, results


def _shuffled_buffers(
    rows: np.ndarray, rng: np.random.Generator, block_rows: int = 256, buffer_blocks: int = 32
) -> list[np.ndarray]:
    """Rows regrouped for streaming SGD: contiguous blocks (cheap HDF5 reads) in random order, ``buffer_blocks``
    per buffer so one buffer mixes many classes even when the store is sorted by class."""
    blocks = np.array_split(rows, max(1, int(np.ceil(len(rows) / block_rows))))
    order = rng.permutation(len(blocks))
    return [
        np.concatenate([blocks[b] for b in order[i : i + buffer_blocks]]) for i in range(0, len(order), buffer_blocks)
    ]


def _stream(fs: FeatureStore, layer: str, rows: np.ndarray, rng: np.random.Generator, transform):
    """Yield shuffled ``(X, y)`` buffers of the given rows, preprocessed by ``transform``."""
    for buffer in _shuffled_buffers(rows, rng):
        X, y = fs.read_rows(np.sort(buffer), layer)
        perm = rng.permutation(len(y))
        yield transform(X[perm].astype(np.float32, copy=False)), y[perm]


def _train_out_of_core(
    fs: FeatureStore, layer: str, preset: Preset, config: ClassifierConfig, preprocess: Sequence[str]
):
    """SGD through ``partial_fit`` over store blocks; memory is bounded by one buffer, whatever the store size."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.preprocessing import Normalizer, StandardScaler

    params = dict(config.params)
    epochs = int(params.pop("epochs", 10))
    train_rows, val_rows = fs.rows("train"), fs.rows("val")
    all_rows = np.sort(np.concatenate([train_rows, val_rows]))
    y_train = fs.labels("train")
    classes = np.unique(np.concatenate([y_train, fs.labels("val")]))
    dims = fs.feature_dims()[layer]
    rng = np.random.default_rng(config.seed)
    if len(val_rows):
        fit_rows, holdout_rows, scheme = train_rows, val_rows, "validation split (out of core)"
    else:
        holdout = np.concatenate(  # 10 % per class, never a class's only image
            [
                rng.permutation(train_rows[y_train == c])[
                    : min(int((y_train == c).sum()) - 1, max(1, int(0.1 * (y_train == c).sum())))
                ]
                for c in np.unique(y_train)
            ]
        )
        holdout_rows = np.sort(holdout)
        fit_rows = np.setdiff1d(train_rows, holdout_rows)
        scheme = f"seeded 10% hold-out of train (out of core, seed {config.seed})"

    def make_transform(rows: np.ndarray):
        steps = []
        for step in preprocess:
            if step == "l2":
                steps.append(Normalizer().fit(np.zeros((1, dims), dtype=np.float32)))  # stateless
            else:  # standard: fitted in one streaming pass
                scaler = StandardScaler()
                for X, _ in _stream(fs, layer, rows, np.random.default_rng(0), _chain(steps)):
                    scaler.partial_fit(X)
                steps.append(scaler)
        return _chain(steps), steps

    def fit(alpha: float, rows: np.ndarray):
        transform, steps = make_transform(rows)
        est = preset.build(alpha, config.seed, config.class_weight, **params)
        epoch_rng = np.random.default_rng(config.seed)
        for _ in range(epochs):
            for X, y in _stream(fs, layer, rows, epoch_rng, transform):
                est.partial_fit(X, y, classes=classes)
        return est, steps, transform

    score_fn = balanced_accuracy_score if config.scoring == "balanced_accuracy" else accuracy_score
    search_result = None
    value = None if config.value == "auto" else float(config.value)
    if value is None:
        t0 = time.perf_counter()
        grid = [float(v) for v in (config.grid or preset.grid)]
        curve = []
        for alpha in grid:
            est, _, transform = fit(alpha, fit_rows)
            truth, predicted = [], []
            for X, y in _stream(fs, layer, holdout_rows, np.random.default_rng(0), transform):
                truth.append(y)
                predicted.append(est.predict(X))
            score = float(score_fn(np.concatenate(truth), np.concatenate(predicted)))
            curve.append({"value": alpha, "mean": score, "std": 0.0, "folds": [score]})
        best = int(np.argmax([c["mean"] for c in curve]))
        value = grid[best]
        search_result = SearchResult(preset.param, scheme, value, curve, time.perf_counter() - t0)
    t0 = time.perf_counter()
    est, steps, _ = fit(value, all_rows)
    fit_seconds = time.perf_counter() - t0
    pipeline = Pipeline([*zip(preprocess, steps, strict=True), ("clf", est)])
    trained_on = {
        "splits": ["train", "val"] if len(val_rows) else ["train"],
        "n": len(all_rows),
        "epochs": epochs,
        "out_of_core": True,
    }
    return pipeline, value, search_result, fit_seconds, trained_on


def _chain(steps):
    def transform(X):
        for step in steps:
            X = step.transform(X)
        return X

    return transform


def evaluate_model(
    model: TrainedModel, store: FeatureStore, split: str = "test", n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Test metrics of a model on a store's split (after checking the store matches the model's spec)."""
    check_compatible(model, store)
    if store.class_names != model.class_names:
        raise SpecMismatchError(
            f"the model knows classes {model.class_names[:10]}, the store {store.class_names[:10]}; they must match"
        )
    X = store.features(model.layer, split=split, dtype=np.float32)
    y = store.labels(split)
    if not len(y):
        raise ValueError(f"{store.path} has no labelled {split} images to evaluate on")
    t0 = time.perf_counter()
    y_pred = model.predict(X)
    predict_seconds = time.perf_counter() - t0
    metrics = evaluate(y, y_pred, model.class_names, scores=model.scores(X), n_bootstrap=n_bootstrap, seed=seed)
    metrics["predict_seconds"] = round(predict_seconds, 4)
    metrics["split"] = split
    return metrics


def few_shot_curve(
    store: FeatureStore,
    preset: Preset,
    value: float | None,
    preprocess: Sequence[str],
    config: ClassifierConfig,
    shots: Sequence[int | str],
    draws: int,
    layer: str,
) -> list[dict]:
    """Test accuracy with k training images per class, mean ± std over seeded draws.

    The hyper-parameter is the one chosen on the full training set (chosen without test data), so each
    point isolates the effect of fewer examples.
    """
    X, y, _ = _labelled_rows(store, layer)
    Xt, yt = store.features(layer, split="test", dtype=np.float32), store.labels("test")
    curve = []
    for k in shots:
        accs = []
        n_draws = 1 if k == "all" else draws
        for d in range(n_draws):
            if k == "all":
                idx = np.arange(len(y))
            else:
                rng = np.random.default_rng([config.seed, d, int(k)])
                idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(k)] for c in np.unique(y)])
            if len(np.unique(y[idx])) < 2:
                continue
            pipe = build_pipeline(preset, value, preprocess, config.seed, config.class_weight, dict(config.params))
            if preset.param == "n_neighbors":
                pipe.set_params(clf__n_neighbors=min(int(value or 5), len(idx)))
            _fit_quietly(pipe, X[idx], y[idx])
            accs.append(float((pipe.predict(Xt) == yt).mean()))
        if accs:
            curve.append(
                {
                    "shots": k,
                    "draws": len(accs),
                    "mean": float(np.mean(accs)),
                    "std": float(np.std(accs)),
                    "accuracies": accs,
                }
            )
    return curve


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write a results JSON atomically."""
    text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


@dataclass
class Prediction:
    """One image's prediction: the top class, its score and the top-k classes (or the error)."""

    path: str
    label: str | None = None
    score: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def predict_images(
    images: Sequence[str | Path],
    model: TrainedModel,
    *,
    top_k: int = 5,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = False,
) -> list[Prediction]:
    """Run f then g on image files: extract with the model's recorded spec, then classify.

    The backbone is rebuilt from the spec the model was trained on (and its weight checksum verified);
    features go through the store cache, so predicting the same files again is instant. Images that
    cannot be read get a :class:`Prediction` with ``error`` set; the others are still predicted.
    """
    from featx.data import from_files
    from featx.extract import extract

    if top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    if not images:
        raise ValueError("no images to predict")
    spec = model.meta["store_spec"]
    manifest = from_files(images)
    result = extract(
        manifest,
        spec["backbone"],
        layers=[model.layer],
        pool=spec["pool"],
        dtype=spec["dtype"],
        amp=spec["amp"],
        tta=spec["tta"],
        max_pixels=spec.get("max_pixels", DEFAULT_MAX_PIXELS),
        decode=spec.get("decode", "exact"),
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        max_failures="inf",
        expect_weights_sha256=spec["weights_sha256"],
    )
    with FeatureStore(result.path) as store:
        check_compatible(model, store)
        X = store.features(model.layer, dtype=np.float32)
        ids = store.ids()
        failures = {f.id: f.reason for f in store.failures}
    by_id: dict[str, Prediction] = {i: Prediction(i, error=reason) for i, reason in failures.items()}
    if len(ids):
        scores = model.scores(X)
        predicted = model.predict(X)
        for row, (image_id, label) in enumerate(zip(ids, predicted, strict=True)):
            pred = Prediction(image_id, label=model.class_names[int(label)])
            if scores is not None:
                order = np.argsort(-scores[row])[: min(top_k, len(model.class_names))]
                pred.top_k = [(model.class_names[int(c)], float(scores[row, c])) for c in order]
                pred.score = float(scores[row, int(label)])
            by_id[image_id] = pred
    return [by_id[i] for i in manifest.ids]
