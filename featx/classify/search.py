"""The hyper-parameter search on the training rows: the val split, else stratified k-fold, folds in parallel.

The search is converged and dense where it matters:

1. the coarse grid (decades for the presets) is scored in ascending order, folds in parallel;
   warm-started presets walk each fold's estimator along the grid in one task. For the others (svm),
   climbing ``C`` stops once the mean score has fallen at two consecutive values, or has fallen to more
   than one standard error below the best so far (their large-``C`` fits are the slow ones, and past a
   peak they only fall further); the values not paid for are ``skipped``;
2. a best value at an edge of the grid widens it by two decades on that side before it is accepted;
3. four more values (thirds of a decade) are scored inside ±1 decade of the best.

Every fit records whether it converged (``n_iter_`` below ``max_iter``); a :class:`ConvergenceWarning` is
not shown during the search because the fact is in each point's ``converged`` instead. The best mean over
all scored values wins (ties: the smaller value).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline

from featx.classify.arrays import take, to_host
from featx.classify.presets import Preset
from featx.results import SearchPoint, SearchSummary

__all__ = ["SEARCH_VERSION", "SearchResult", "fit_converged", "search"]

#: Bumped whenever the search or the refit can choose differently, so cached pipeline cells are re-run.
#: 2: converged, refined, widened search (issue 13). 3: climbing C also stops at a fall of over one standard error.
SEARCH_VERSION = 3

log = logging.getLogger(__name__)

#: Searched parameters on a continuous log scale: widened at an edge and refined around the best.
_LOG_PARAMS = ("C", "alpha")
#: Offsets (in decades) of the refined values around the best.
_REFINE = (-2 / 3, -1 / 3, 1 / 3, 2 / 3)
#: How far a best value at an edge widens the grid, in decades.
_WIDEN = (1, 2)


# -------------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """The outcome of a hyper-parameter search.

    Attributes
    ----------
    param, scheme : str
        The searched hyper-parameter, and how it was validated (e.g. ``"5-fold stratified CV"``).
    best : float or None
        The value with the best mean score over :attr:`curve` and :attr:`refined`.
    curve : list of SearchPoint
        The coarse grid and any widening, ascending: mean ± std over the folds, each fold's score, whether
        every fold's fit converged and the most iterations one took.
    seconds : float
    refined : list of SearchPoint
        The values scored inside ±1 decade of the coarse best.
    at_edge : bool
        The best is still at an edge of the scored range after widening.
    widened : list of float
        Values added because the coarse best sat at an edge.
    stopped_early : float or None
        The value after which climbing stopped (the mean fell twice in a row, or once to more than a standard
        error below the best); None if the grid was climbed.
    skipped : list of float
        The grid values not scored because of that stop.
    """

    param: str
    scheme: str
    best: float | None
    curve: list[SearchPoint] = field(default_factory=list)
    seconds: float = 0.0
    refined: list[SearchPoint] = field(default_factory=list)
    at_edge: bool = False
    widened: list[float] = field(default_factory=list)
    stopped_early: float | None = None
    skipped: list[float] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        """Every fit of the search converged (fits without an iteration count count as converged)."""
        return all(p.get("converged") is not False for p in self.curve + self.refined)

    def to_dict(self) -> SearchSummary:
        """The ``"search"`` section of the results."""
        out = dataclasses.asdict(self)
        return SearchSummary(**{**out, "seconds": round(self.seconds, 3), "converged": self.converged})


def fit_converged(estimator: Any) -> tuple[bool | None, int | None]:
    """Whether a fitted estimator (or a pipeline's last step) converged, and the iterations it took.

    An iterative scikit-learn solver converged when ``n_iter_`` (for liblinear and lbfgs the most over the
    classes) stayed below ``max_iter``; this is the test behind their :class:`ConvergenceWarning`.
    A ``max_iter`` of zero or below (libsvm's ``-1``) means "no limit": such a fit ran until its own tolerance,
    so it converged. ``(None, None)`` for estimators that do not iterate (ridge, k-NN).
    """
    if isinstance(estimator, Pipeline):
        estimator = estimator.steps[-1][1]
    n_iter, max_iter = getattr(estimator, "n_iter_", None), getattr(estimator, "max_iter", None)
    if n_iter is None or max_iter is None:
        return None, None
    n = int(np.max(to_host(n_iter)))
    return (int(max_iter) <= 0 or n < int(max_iter)), n


def fit_quietly(est, X, y):
    """Fit with :class:`ConvergenceWarning` hidden: only where the caller records :func:`fit_converged`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _prepare_fold(pipeline: Pipeline, X, y, train_idx, val_idx) -> tuple[Any, ...]:
    """One fold's rows (views where contiguous, as a val split's are) with the preprocessing fitted on its
    training part; NumPy arrays or torch tensors alike."""
    Xtr, Xva, ytr, yva = take(X, train_idx), take(X, val_idx), take(y, train_idx), take(y, val_idx)
    if len(pipeline.steps) > 1:
        pre = clone(Pipeline(pipeline.steps[:-1])).fit(Xtr, ytr)
        Xtr, Xva = pre.transform(Xtr), pre.transform(Xva)
    return Xtr, ytr, Xva, yva


def _fit_point(est, param: str, value: float, warm: bool, fold: tuple[np.ndarray, ...], scoring: str):
    """Fit one fold at one value (continuing ``est`` when warm); its score, convergence and the estimator."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    Xtr, ytr, Xva, yva = fold
    est = est if warm else clone(est)
    if param == "n_neighbors":  # a fold may hold fewer images than the largest k
        value = min(int(value), len(ytr))
    est.set_params(**{param: value})
    est.fit(Xtr, ytr)  # ConvergenceWarning: hidden by _score_fold, recorded from n_iter_
    score_fn = balanced_accuracy_score if scoring == "balanced_accuracy" else accuracy_score
    converged, n_iter = fit_converged(est)
    # Scored on the host: the same float64 arithmetic whichever arrays the fit ran on.
    return float(score_fn(to_host(yva), to_host(est.predict(Xva)))), converged, n_iter, est


def _score_fold(pipeline: Pipeline, preset: Preset, values, X, y, train_idx, val_idx, scoring: str) -> list[tuple]:
    """One fold along ``values``: preprocessing fitted once, the estimator warm-started along them when it can;
    ``(score, converged, n_iter)`` per value."""
    fold = _prepare_fold(pipeline, X, y, train_idx, val_idx)
    est = clone(pipeline.steps[-1][1])
    if preset.warm_start:
        est.set_params(warm_start=True)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # each point records whether its fit converged
        for value in values:
            score, converged, n_iter, est = _fit_point(est, preset.param, value, preset.warm_start, fold, scoring)
            out.append((score, converged, n_iter))
    return out


@dataclass
class _Scorer:
    """Scores ascending values on the folds: warm-started presets one task per fold along all the values,
    the others one task per (fold, value), a value at a time when climbing may stop early."""

    parallel: Parallel
    pipeline: Pipeline
    preset: Preset
    X: np.ndarray
    y: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    scoring: str

    @property
    def n_validated(self) -> int:
        """The images scored at each value, over all folds."""
        return sum(len(val_idx) for _, val_idx in self.folds)

    def _run(self, values: Sequence[float]) -> list[list[tuple]]:
        """``table[value][fold] = (score, converged, n_iter)``."""
        if self.preset.warm_start:
            tasks = [(f, list(values)) for f in range(len(self.folds))]
        else:
            tasks = [(f, [v]) for v in values for f in range(len(self.folds))]
        results = self.parallel(
            delayed(_score_fold)(self.pipeline, self.preset, vals, self.X, self.y, *self.folds[f], self.scoring)
            for f, vals in tasks
        )
        table = [[None] * len(self.folds) for _ in values]
        index = {v: i for i, v in enumerate(values)}
        for (f, vals), out in zip(tasks, results, strict=True):
            for v, cell in zip(vals, out, strict=True):
                table[index[v]][f] = cell
        return table

    def score_path(self, values: Sequence[float], early_stop: bool) -> tuple[list[SearchPoint], list[float]]:
        """The points of ``values`` (ascending); with ``early_stop``, stop once the mean fell twice in a row or
        fell clearly (:func:`_fell_clearly`).

        Climbing with early stop scores as many values at once as the workers can take beside the folds (with
        one val fold: a value per worker). Values scored past the stop are dropped, so the curve, the choice and
        ``skipped`` are those of a climb one value at a time, whatever the number of workers.
        """
        step = len(values)
        if early_stop and not self.preset.warm_start:
            step = max(1, effective_n_jobs(self.parallel.n_jobs) // len(self.folds))
        points: list[SearchPoint] = []
        for start in range(0, len(values), step):
            chunk = values[start : start + step]
            for value, cells in zip(chunk, self._run(chunk), strict=True):
                points.append(_point(value, *map(list, zip(*cells, strict=True))))
                means = [p["mean"] for p in points[-3:]]
                fell_twice = len(means) == 3 and means[2] < means[1] < means[0]
                if early_stop and (fell_twice or _fell_clearly(points, self.n_validated)):
                    return points, [float(v) for v in values[len(points) :]]
        return points, []


def _fell_clearly(points: Sequence[SearchPoint], n_validated: int) -> bool:
    """The last score fell, to more than one binomial standard error below the best before it.

    A fall within the noise of ``n_validated`` images waits for a second fall; a clear one stops at once. On the
    four benchmark sets this skips CIFAR-10's C = 100 fit (13.6 s of a 28 s search) and chooses as before
    (benchmarks/RESULTS.md, "Under the split plan").
    """
    if len(points) < 2 or points[-1]["mean"] >= points[-2]["mean"]:
        return False
    best = max(p["mean"] for p in points[:-1])
    p = min(max(best, 0.0), 1.0)
    return best - points[-1]["mean"] > float(np.sqrt(p * (1.0 - p) / max(n_validated, 1)))


def _point(value: float, scores: list[float], converged: list[bool | None], n_iter: list[int | None]) -> SearchPoint:
    point = SearchPoint(value=float(value), mean=float(np.mean(scores)), std=float(np.std(scores)), folds=scores)
    if any(c is not None for c in converged):
        point["converged"] = all(c is not False for c in converged)
        point["n_iter"] = max(n for n in n_iter if n is not None)
    return point


def _best(points: Sequence[SearchPoint]) -> SearchPoint:
    """The best mean; ties: the smaller value."""
    ordered = sorted(points, key=lambda p: p["value"])
    return ordered[int(np.argmax([p["mean"] for p in ordered]))]


def _new(values: Sequence[float], scored: Sequence[SearchPoint]) -> list[float]:
    """``values`` not scored yet (to a relative 1e-9), ascending."""
    done = [p["value"] for p in scored]
    return sorted(v for v in values if v > 0 and not any(abs(v - d) <= 1e-9 * d for d in done))


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
    refine: bool = True,
) -> SearchResult:
    """Score the grid on every fold (ascending, folds in parallel), widen at an edge, refine around the best.

    Parameters
    ----------
    pipeline : Pipeline
        Preprocessing steps (fitted inside each fold) and the estimator.
    preset : Preset
    grid : sequence of float
        The coarse values; searched in ascending order.
    X, y : arrays
        NumPy arrays, or torch tensors under scikit-learn's Array API dispatch (:mod:`featx.classify.arrays`;
        then ``n_jobs=1``).
    folds : list of (train_idx, val_idx)
        Row indices; a contiguous run of rows (a val split) is taken as a view.
    scheme : str
        How the folds were made, for the record.
    n_jobs : int, default=-1
        Parallel jobs (joblib: processes, or the workers of a backend such as Dask's).
    scoring : {"accuracy", "balanced_accuracy"}
    refine : bool, default=True
        Widen at an edge and refine around the best (for ``C`` and ``alpha``); also stops climbing ``C``
        early. ``False`` scores exactly ``grid``.

    Returns
    -------
    SearchResult
    """
    t0 = time.perf_counter()
    grid = sorted({float(v) for v in grid})
    dense = refine and preset.param in _LOG_PARAMS and len(grid) >= 2
    with Parallel(n_jobs=n_jobs) as parallel:
        scorer = _Scorer(parallel, pipeline, preset, X, y, folds, scoring)
        curve, skipped = scorer.score_path(grid, early_stop=dense and preset.param == "C" and not preset.warm_start)
        result = SearchResult(preset.param, scheme, None, curve, skipped=skipped)
        if skipped:
            result.stopped_early = curve[-1]["value"]
        if dense:
            _widen_and_refine(result, scorer, _log_step(grid))
    result.best = _best(result.curve + result.refined)["value"]
    lo, hi = min(p["value"] for p in result.curve), max(p["value"] for p in result.curve)
    result.at_edge = _edge(result.curve) != 0 and result.best in (lo, hi)
    result.seconds = time.perf_counter() - t0
    if result.at_edge:
        log.warning(
            "best %s=%g is at the edge of the searched values %g … %g even after widening; consider --grid",
            preset.param,
            result.best,
            lo,
            hi,
        )
    if not result.converged:
        log.warning("some %s search fits did not converge (see 'converged' in the search curve)", preset.name)
    return result


def _log_step(grid: Sequence[float]) -> float:
    """The grid's spacing as a factor (a decade for the presets' grids), at least a decade."""
    ratios = np.diff(np.log10(grid))
    return float(10 ** max(1.0, float(np.median(ratios)))) if len(ratios) else 10.0


def _edge(curve: Sequence[SearchPoint]) -> int:
    """-1 or +1 when the best mean is reached only at the lowest or highest value (a plateau reaching inside
    the grid is no edge optimum), else 0."""
    means = [p["mean"] for p in curve]
    top = max(means)
    if len(means) < 2 or all(m == top for m in means):
        return 0
    if means[0] == top and means[1] < top:
        return -1
    return 1 if means[-1] == top and means[-2] < top else 0


def _widen_and_refine(result: SearchResult, scorer: _Scorer, step: float) -> None:
    """Widen by two steps at an edge optimum, then score four values inside ±1 decade of the best (inside
    the scored range, so a best accepted at an edge is refined inwards)."""
    side = _edge(result.curve)
    if side and not (side > 0 and result.skipped):
        best = _best(result.curve)["value"]
        extra = _new([best * step ** (side * k) for k in _WIDEN], result.curve)
        points, skipped = scorer.score_path(extra, early_stop=result.param == "C" and not scorer.preset.warm_start)
        result.widened = [p["value"] for p in points]
        result.skipped += skipped
        result.curve = sorted(result.curve + points, key=lambda p: p["value"])
    best = _best(result.curve)["value"]
    lo, hi = result.curve[0]["value"], result.curve[-1]["value"]
    offsets = _REFINE if lo < best < hi else [d / 5 * (1 if best == lo else -1) for d in (1, 2, 3, 4)]
    refined = _new([best * 10**d for d in offsets], result.curve)
    result.refined, _ = scorer.score_path(refined, early_stop=False)


def cv_folds(y: np.ndarray, splits: np.ndarray, cv: int, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
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
