"""The hyper-parameter search on the training rows: the val split, else stratified k-fold, in parallel.

Warm-started presets fit each fold once along the whole grid; the best mean score wins (ties: the first
value in grid order), and a best value at the edge of the grid is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline

from featx.classify.presets import Preset
from featx.results import SearchPoint, SearchSummary

__all__ = ["SearchResult", "search"]

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """The outcome of a hyper-parameter search."""

    param: str
    scheme: str
    best: float | None
    curve: list[SearchPoint] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> SearchSummary:
        """The ``"search"`` section of the results."""
        return SearchSummary(**{**dataclasses.asdict(self), "seconds": round(self.seconds, 3)})


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
