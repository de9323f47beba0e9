"""g on cached f(x): scikit-learn classifiers trained on a feature store, searched, evaluated and saved safely.

The protocol follows the linear-evaluation literature (VISSL's LinearSVC sweep; Kornblith et al. 2019's
logistic regression on fixed features) and featx's comparison protocol (:data:`SELECTION_RULE`): the store's
split plan gives every row the same train, val and test images; the regularisation strength is chosen on val
(by stratified k-fold cross-validation on train only when there is no val split) over a log grid, in parallel,
with warm starts along the grid where the solver allows; the final model is fit on train with the chosen value
(on train and val under ``refit="train+val"``, as Kornblith et al. 2019 do) and scored once on the test split.
Fine-tuning follows the same rule, so every row of a comparison trains on the same images and selects on the
same images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featx._runtime.env import library_versions, timestamp
from featx._runtime.io import check_writable
from featx.classify import memory
from featx.classify._rows import labelled_rows, labelled_store_rows
from featx.classify.arrays import choose_path, cuda_free_bytes, take, to_numpy_pipeline
from featx.classify.config import ClassifierConfig, TrainRun
from featx.classify.fewshot import ONE_SHOT_VALUE, drawable_shots, few_shot_curve, shot_rows
from featx.classify.model import TrainedModel, check_compatible
from featx.classify.presets import Preset, build_pipeline
from featx.classify.search import SearchResult, cv_folds, fit_converged, fit_quietly, search
from featx.data.splits import FinalFit, SplitPlan
from featx.exceptions import SpecMismatchError, unknown
from featx.metrics import evaluate, predictions
from featx.results import (
    CellInfo,
    ClassifierResults,
    ClassifierSettings,
    FewShotPoint,
    StoreInfo,
    TestMetrics,
    TrainSummary,
    ValScore,
    assemble,
    header,
    metrics_section,
    split_section,
    write_results,
)
from featx.store.reader import FeatureStore

__all__ = [
    "ONE_SHOT_VALUE",
    "Fitted",
    "evaluate_model",
    "few_shot_curve",
    "fit_in_memory",
    "shot_rows",
    "train",
]

log = logging.getLogger(__name__)


def train(
    store: FeatureStore | str | Path,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    plan: SplitPlan | None = None,
    n_jobs: int = -1,
    out_dir: str | Path | None = None,
    shots: Sequence[int | str] | None = None,
    draws: int = 5,
    scheduler: str | None = None,
    cell: CellInfo | None = None,
    array_path: str | None = None,
    refit: str = "train",
) -> tuple[TrainedModel, ClassifierResults]:
    """Search, refit and evaluate one classifier on a store; optionally write ``model.skops`` and ``results.json``.

    Parameters
    ----------
    store : FeatureStore or path
    config : ClassifierConfig
    plan : SplitPlan, optional
        The split plan to open a store path with (the default plan when ``None``); an open
        :class:`FeatureStore` brings its own, and a different ``plan`` beside it is refused.
    n_jobs : int, default=-1
        Parallel jobs for the search (-1: all cores).
    out_dir : str or Path, optional
        Where to write ``model.skops`` and ``results.json``.
    shots : sequence of int or "all", optional
        Also compute a learning curve: k training images per class (several seeded draws).
    draws : int, default=5
    scheduler : str, optional
        Address of a Dask scheduler (``tcp://HOST:8786``) to run the search's folds on, through joblib's
        Dask backend (see :func:`featx.classify.cluster.scheduler`); the results are the same as a local run's.
        Needs ``pip install 'featx[dask]'``.
    cell : CellInfo, optional
        Which cell of a ``featx run`` job this is, recorded in the results (written once, never amended).
    array_path : {"auto", "numpy", "torch", "cuda"}, optional
        Where an in-memory fit computes (:mod:`featx.classify.arrays`); ``$FEATX_ARRAY_PATH``, else ``auto``:
        CUDA tensors for a preset with Array API support when a GPU has room, else NumPy.
    refit : {"train", "train+val"}, default="train"
        What the final model is fit on once val has chosen the hyper-parameter
        (:data:`~featx.data.splits.REFITS`). Under ``train+val`` the fit on train alone is written too, as
        ``model-train.skops``: an LP-FT fine-tune chooses its rate and epochs from it, as val has not seen it.

    Returns
    -------
    (TrainedModel, ClassifierResults)
        The model and the results (the ``results.json`` content; test metrics under ``"test"``).
    """
    preset = config.preset  # the config checked itself when it was built
    TrainRun(n_jobs=n_jobs, shots=shots, draws=draws)  # so do these, by their table
    refit = FinalFit(refit).refit  # and the refit by its own
    if scheduler is not None and config.out_of_core:
        raise ValueError("out-of-core training streams the store on this machine; drop --scheduler or out-of-core")
    if shots and config.out_of_core:
        raise ValueError("learning curves (shots) need the features in memory; drop out-of-core or shots")
    from featx.classify.cluster import scheduler as dask_scheduler

    with dask_scheduler(scheduler):  # connect first: a bad address fails before the store is read
        owns = not isinstance(store, FeatureStore)
        if not owns and plan is not None and plan != store.plan:
            raise ValueError(
                f"{store.path} is open under the split plan {store.plan}, not {plan}: open it with that plan"
            )
        fs = FeatureStore(store, plan) if owns else store
        try:
            if out_dir is not None:  # before the search, whose work an unwritable folder would lose
                check_writable(out_dir, "out_dir")
            layer = _check_layer(fs, config.layer)
            if shots:  # before any fit: a curve that cannot be drawn is refused, not found out after training
                shots = drawable_shots(fs.labels("train"), fs.class_names, shots, fs.path)
            preprocess = config.steps(preset)
            if config.out_of_core:
                fitted = _train_out_of_core(fs, layer, preset, config, preprocess, refit)
            else:
                fitted = _train_in_memory(
                    fs, layer, preset, config, preprocess, n_jobs, array_path, refit=refit, keep_on_train=True
                )
            model = _wrap_model(fs, config, preset, layer, fitted)
            curve = few_shot_curve(fs, preset, fitted.value, preprocess, config, shots, draws, layer) if shots else None
            results = _classifier_results(fs, model, fitted, refit, few_shot=curve, cell=cell)
            if out_dir is not None:
                _write_artifacts(Path(out_dir), model, results)
                if fitted.on_train is not None:
                    on_train = TrainedModel(fitted.on_train, {**model.meta, "trained_on": _on_train(fitted)})
                    on_train.save(Path(out_dir) / TRAIN_ONLY_MODEL)
            return model, results
        finally:
            if owns:
                fs.close()


@dataclass
class Fitted:
    """A refit classifier and how it was chosen: what both training paths hand to evaluation."""

    pipeline: Pipeline
    value: float | None  # the chosen (or fixed) hyper-parameter; None for a preset without one
    search: SearchResult | None  # None when the value was fixed
    fit_seconds: float  # the final refit only
    trained_on: dict[str, Any]  # {"splits", "n"} (+ "epochs", "out_of_core" out of core)
    refit: dict[str, Any] = field(default_factory=dict)  # {"converged", "n_iter", "max_iter"} of the final fit
    on_train: Pipeline | None = None  # under refit "train+val": the fit on train alone, which val judged


#: Under refit ``train+val``, the fit on train alone beside ``model.skops`` (an LP-FT's selection run starts from it).
TRAIN_ONLY_MODEL = "model-train.skops"


def _on_train(fitted: Fitted) -> dict[str, Any]:
    """``trained_on`` of the fit on train alone kept beside a train+val refit."""
    n = fitted.trained_on["n"] - fitted.trained_on.get("val_n", 0)
    return {**fitted.trained_on, "splits": ["train"], "n": n}


def _check_layer(fs: FeatureStore, layer: str | None) -> str:
    """The configured layer, else the store's first; an unknown one lists the store's layers."""
    layer = layer or fs.layers[0]
    if layer not in fs.layers:
        raise unknown("layer of this store", layer, fs.layers, f"It holds: {', '.join(fs.layers)}.")
    return layer


def _train_in_memory(
    fs: FeatureStore,
    layer: str,
    preset: Preset,
    config: ClassifierConfig,
    preprocess: Sequence[str],
    n_jobs: int,
    array_path: str | None = None,
    refit: str = "train",
    keep_on_train: bool = False,
) -> Fitted:
    """Search (unless the value is fixed) and refit on the features held in memory, once the memory estimate of
    the whole fit has been checked against what the machine has (before the features are read)."""
    sizes = fs.splits
    n_train = sizes.get("train", 0) + (sizes.get("val", 0) if refit == "train+val" else 0)  # the final fit's rows
    shape = (sizes.get("train", 0) + sizes.get("val", 0), fs.feature_dims()[layer], len(fs.class_names))
    path = _path_that_fits(preset, _base_pipeline(preset, config, preprocess), *shape, n_train, array_path)
    host = memory.estimate(preset.name, *shape, n_fit=n_train, path=path.name)
    memory.check_fits(dataclasses.replace(host, work=0) if path.name == "cuda" else host)  # cuda: the features
    X, y, splits = labelled_rows(fs, layer)
    if len(np.unique(y)) < 2:
        raise ValueError(f"{fs.path} has a single class in its training data; a classifier needs two or more")
    # The request as given (not the path chosen here): the fit chooses the same path and says why, once.
    return fit_in_memory(
        X, y, splits, preset, config, n_jobs=n_jobs, preprocess=preprocess, array_path=array_path, refit=refit,
        keep_on_train=keep_on_train,
    )  # fmt: skip


def fit_in_memory(
    X: np.ndarray,
    y: np.ndarray,
    splits: np.ndarray,
    preset: Preset,
    config: ClassifierConfig,
    *,
    n_jobs: int = -1,
    preprocess: Sequence[str] | None = None,
    array_path: str | None = None,
    refit: str = "train",
    keep_on_train: bool = False,
) -> Fitted:
    """Search the hyper-parameter (unless ``config`` fixes it) on the train/val rows, then refit, converged.

    Parameters
    ----------
    X, y : arrays
        Features and class indices of the labelled rows.
    splits : array of str
        ``"train"`` or ``"val"`` per row; a val split is the search's validation set, else k-fold CV.
    preset : Preset
        ``config.preset``.
    config : ClassifierConfig
    n_jobs : int, default=-1
    preprocess : sequence of str, optional
        By default ``config.steps(preset)``.
    array_path : {"auto", "numpy", "torch", "cuda"}, optional
        Where the search and the refit compute (:func:`featx.classify.arrays.choose_path`); the fitted
        pipeline comes back with NumPy arrays whichever path fitted it.
    refit : {"train", "train+val"}, default="train"
        Fit the final pipeline on the train rows, or on the train and val rows.
    keep_on_train : bool, default=False
        Under ``train+val``, also fit on the train rows alone and keep it as ``Fitted.on_train`` (one more fit).

    Returns
    -------
    Fitted
        The refit pipeline (``trained_on`` records whether its fit converged and the array path it took).

    Raises
    ------
    InsufficientMemoryError
        The fit's estimated peak memory exceeds what the machine has (:mod:`featx.classify.memory`).
    """
    preprocess = config.steps(preset) if preprocess is None else preprocess
    params = dict(config.params)
    value = None if config.value == "auto" else float(config.value)
    on_train = splits == "train"  # SELECTION_RULE: the val rows choose; refit "train+val" fits them after
    has_val = bool((~on_train).any())
    refitted = FinalFit(refit).refit == "train+val" and has_val
    fit = on_train | (splits == "val") if refitted else on_train
    fit_rows = np.flatnonzero(fit)
    train_rows = np.flatnonzero(on_train)
    grid = config.grid or preset.grid
    base = _base_pipeline(preset, config, preprocess)
    k = len(np.unique(y))
    path = _path_that_fits(preset, base, *X.shape, k, len(fit_rows), array_path)
    if path.on_torch:
        n_jobs = 1  # one device, one process: the folds run one after another, each a set of matrix products
    if path.name != "cuda":
        n_jobs = _jobs_that_fit(preset, X, k, len(fit_rows), n_jobs, path.name)
    log.info("%s: fitting on the %s path (%s)", preset.name, path.name, path.reason)
    search_result = None
    kept = None
    with path.dispatch():
        Xp, yp = path.put(X), path.put(y)  # the features cross to the device once
        if value is None and preset.param:
            folds, scheme = cv_folds(y, splits, config.cv, config.seed)
            search_result = search(base, preset, grid, Xp, yp, folds, scheme, n_jobs, config.scoring)
            value = search_result.best
            log.info("%s: chose %s=%g (%s, %.1f s)", preset.name, preset.param, value, scheme, search_result.seconds)
        pipeline = build_pipeline(preset, value, preprocess, config.seed, config.class_weight, params)
        t0 = time.perf_counter()
        convergence = _refit_converged(pipeline, take(Xp, fit_rows), take(yp, fit_rows), preset)
        fit_seconds = time.perf_counter() - t0
        if refitted and keep_on_train:
            kept = build_pipeline(preset, value, preprocess, config.seed, config.class_weight, params)
            _refit_converged(kept, take(Xp, train_rows), take(yp, train_rows), preset)
        del Xp, yp
    to_numpy_pipeline(pipeline)
    if kept is not None:
        to_numpy_pipeline(kept)
    selected_on = "none (fixed)" if search_result is None else ("val" if has_val else "cv on train")
    trained_on = {
        "splits": ["train", "val"] if refitted else ["train"],
        "n": len(fit_rows),
        "selected_on": selected_on,
        "array_path": path.name,
    }
    if refitted:
        trained_on["val_n"] = int((~on_train).sum())
    return Fitted(pipeline, value, search_result, fit_seconds, trained_on, convergence, kept)


def _base_pipeline(preset: Preset, config: ClassifierConfig, preprocess: Sequence[str]) -> Pipeline:
    """The pipeline the search starts from: the fixed value, else the grid's first."""
    first = None if not preset.param else config.value if config.value != "auto" else (config.grid or preset.grid)[0]
    params = dict(config.params)
    return build_pipeline(preset, first, preprocess, config.seed, config.class_weight, params)


def _path_that_fits(preset: Preset, base: Pipeline, n: int, d: int, k: int, n_fit: int, requested: str | None):
    """The array path (:func:`~featx.classify.arrays.choose_path`); CUDA asked for but without room for the fit's
    estimate is refused with the numbers."""
    device = memory.estimate(preset.name, n, d, k, n_fit=n_fit, path="cuda")
    path = choose_path(base, requested, need_bytes=device.peak)
    if path.name == "cuda" and (free := cuda_free_bytes()) is not None:
        memory.check_fits(device, available=free, where="GPU memory free")
    return path


def _jobs_that_fit(preset: Preset, X: np.ndarray, k: int, n_fit: int, n_jobs: int, path: str = "numpy") -> int:
    """``n_jobs``, lowered to the search workers whose memory estimate fits; refuses a fit that does not fit even
    on one (the features are held already: only the working set must fit)."""
    from joblib import effective_n_jobs

    workers = effective_n_jobs(n_jobs)
    one = memory.estimate(preset.name, *X.shape, k, n_fit=n_fit, itemsize=X.itemsize, path=path)
    memory.check_fits(one, held_already=True)
    est = dataclasses.replace(one, workers=workers)
    available = memory.available_bytes() + est.held  # the features held already count against the machine
    fitting = memory.workers_that_fit(est, available)
    if fitting < workers:
        log.warning(
            "%s: searching on %d workers, not %d, so the search fits in memory (%s)",
            preset.name,
            fitting,
            workers,
            est.describe(),
        )
        return fitting
    return n_jobs


#: The refit's ``max_iter`` is raised this many times (×10 each) until its fit converges.
_REFIT_RETRIES = 2


def _refit_converged(pipeline: Pipeline, X, y, preset: Preset) -> dict[str, Any]:
    """Fit, raising ``max_iter`` tenfold (warm-starting where the solver can) until the fit converges.

    Returns ``{"converged", "n_iter", "max_iter"}``; a fit that still has not converged is logged, and the
    fact goes into the results (``train.converged``).
    """
    est = pipeline.steps[-1][1]
    fit_quietly(pipeline, X, y)
    converged, n_iter = fit_converged(est)
    for _ in range(_REFIT_RETRIES):
        if converged is not False:
            break
        # Only a positive cap is raised: fit_converged never reports an unlimited fit (max_iter <= 0) unconverged.
        more = {"max_iter": int(est.max_iter) * 10}
        if preset.warm_start and "warm_start" in est.get_params():
            more["warm_start"] = True
        est.set_params(**more)
        fit_quietly(pipeline, X, y)
        converged, n_iter = fit_converged(est)
    if converged is False:
        log.warning(
            "%s's final fit did not converge in %d iterations; the results record it (train.converged)",
            preset.name,
            n_iter,
        )
    return {"converged": converged, "n_iter": n_iter, "max_iter": getattr(est, "max_iter", None)}


def _wrap_model(fs: FeatureStore, config: ClassifierConfig, preset: Preset, layer: str, fitted: Fitted) -> TrainedModel:
    """The fitted pipeline with what applying it later needs: the store's spec, classes and the settings."""
    versions = library_versions()
    meta = {
        "featx_version": versions["featx"],
        "store_spec": fs.spec.to_dict(),
        "store_key": fs.key,
        "manifest_fingerprint": fs.attrs.get("manifest_fingerprint"),
        "split_plan": fs.plan.to_dict(),
        "split_hashes": fs.split_hashes,
        "layer": layer,
        "class_names": fs.class_names,
        "classifier": {
            **config.to_dict(),
            "layer": layer,
            "preset": preset.name,
            "preprocess": config.steps(preset),
            "param": preset.param,
            "chosen": fitted.value,
        },
        "trained_on": fitted.trained_on,
        "versions": versions,
        "created_at": timestamp(),
    }
    return TrainedModel(fitted.pipeline, meta)


def _classifier_results(
    fs: FeatureStore,
    model: TrainedModel,
    fitted: Fitted,
    refit: str = "train",
    *,
    few_shot: list[FewShotPoint] | None = None,
    cell: CellInfo | None = None,
) -> ClassifierResults:
    """The ``results.json`` document of a trained model, scored once on the store's test split (if any)."""
    meta = model.meta
    settings: ClassifierSettings = meta["classifier"]
    method = f"{settings['preset']} · {fs.spec.backbone.split(':', 1)[-1]} · {model.layer}"
    store = StoreInfo(
        path=str(fs.path),
        key=fs.key,
        manifest_fingerprint=meta["manifest_fingerprint"],
        spec=fs.spec.to_dict(),
        stats=fs.info()["stats"],
    )
    own = {"store": store, "classifier": settings, "search": fitted.search.to_dict() if fitted.search else None}
    return assemble(
        header("classifier", method, cell=cell, created_at=meta["created_at"], versions=meta["versions"]),
        own | ({"few_shot": few_shot} if few_shot is not None else {}),
        split=split_section(
            fs.plan, fs.split_policy, fs.split_hashes, {s: n for s, n in fs.splits.items() if s != "unlabeled"}, refit
        ),
        train=TrainSummary(n=fitted.trained_on["n"], fit_seconds=round(fitted.fit_seconds, 4), **fitted.refit),
        val=_val_score(fs, model, fitted),
        test=evaluate_model(model, fs) if fs.splits.get("test") else None,
    )


def _write_artifacts(out: Path, model: TrainedModel, results: ClassifierResults) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.skops")
    write_results(out / "results.json", results)


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
    fs: FeatureStore,
    layer: str,
    preset: Preset,
    config: ClassifierConfig,
    preprocess: Sequence[str],
    refit: str = "train",
) -> Fitted:
    """SGD through ``partial_fit`` over store blocks; memory is bounded by one buffer, whatever the store size."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.preprocessing import Normalizer, StandardScaler

    params = dict(config.params)
    epochs = int(params.pop("epochs", 10))
    (train_rows, y_train), (val_rows, y_val) = labelled_store_rows(fs)
    classes = np.unique(np.concatenate([y_train, y_val]))
    if len(classes) < 2:
        raise ValueError(f"{fs.path} has a single class in its training data; a classifier needs two or more")
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
    # SELECTION_RULE: the hold-out chose; under refit "train+val" a val split is fitted after, never a hold-out of
    # train (it is train already).
    final_rows = np.sort(np.concatenate([train_rows, val_rows])) if refit == "train+val" else train_rows
    t0 = time.perf_counter()
    est, steps, _ = fit(value, final_rows)
    fit_seconds = time.perf_counter() - t0
    pipeline = Pipeline([*zip(preprocess, steps, strict=True), ("clf", est)])
    trained_on = {
        "splits": ["train", "val"] if refit == "train+val" and len(val_rows) else ["train"],
        "n": len(final_rows),
        "epochs": epochs,
        "out_of_core": True,
    }
    return Fitted(pipeline, value, search_result, fit_seconds, trained_on)


def _chain(steps):
    def transform(X):
        for step in steps:
            X = step.transform(X)
        return X

    return transform


def _val_score(fs: FeatureStore, model: TrainedModel, fitted: Fitted) -> ValScore | None:
    """The final model's accuracy on the val images, the score a comparison chooses its rows by (``None`` without a
    val split). Under refit ``train+val`` the final model has fit val, so the score is the fit on train alone's (the
    one val judged); out of core, where that fit is not kept, there is none."""
    y = fs.labels("val") if fs.splits.get("val") else np.empty(0)
    refitted = "val" in fitted.trained_on["splits"]
    if not len(y) or (refitted and fitted.on_train is None):
        return None
    judged = fitted.on_train if refitted else model.pipeline
    y_pred = judged.predict(fs.features(model.layer, split="val", dtype=np.float32))
    return ValScore(accuracy=float(np.mean(y_pred == y)), n=len(y))


def evaluate_model(model: TrainedModel, store: FeatureStore, split: str = "test") -> TestMetrics:
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
    scores = model.scores(X)
    return metrics_section(
        evaluate(y, y_pred, model.class_names, scores=scores),
        predictions(store.ids(split), y, y_pred, scores),
        predict_seconds=predict_seconds,
        split=split,
    )
