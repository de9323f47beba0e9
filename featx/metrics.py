"""Test-set metrics shared by every method (classifiers on features and fine-tuned networks).

One function, :func:`evaluate`, so every results JSON carries the same metrics computed the same way,
all from :mod:`sklearn.metrics`, plus Wilson's score interval for accuracy (it does not collapse at 0 or 100 %,
as a percentile bootstrap does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from featx.results import Predictions, TestMetrics

__all__ = ["bootstrap_mean_ci", "evaluate", "predictions", "wilson_ci"]


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of per-image values (images resampled with
    replacement): of a 0/1 correctness, the accuracy; of two rows' correctness differences, the paired gap."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # Resample in blocks so memory stays small for large test sets.
    means = np.empty(n_resamples)
    block = max(1, 2_000_000 // values.size)
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        idx = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion: 49 of 49 right gives [0.927, 1], not a bootstrap's [1, 1]."""
    if n <= 0:
        return (float("nan"), float("nan"))
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def evaluate(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
) -> TestMetrics:
    """Accuracy (with Wilson's 95 % interval), balanced accuracy, macro F1, top-5, per-class report, confusion matrix.

    Parameters
    ----------
    y_true, y_pred : array of int
        Class indices into ``class_names``.
    class_names : sequence of str
    scores : array of shape (n, n_classes), optional
        Decision scores or probabilities; enables top-5 accuracy when there are more than 5 classes.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = list(range(len(class_names)))
    lo, hi = wilson_ci(int((y_true == y_pred).sum()), int(y_true.size))
    result: TestMetrics = {
        "n": int(y_true.size),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "accuracy_ci95": [lo, hi],
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        # Over the classes present in the test labels or predictions: a class absent from both says nothing.
        "macro_f1": float(
            skm.f1_score(y_true, y_pred, labels=np.union1d(y_true, y_pred), average="macro", zero_division=0)
        ),
        "top5_accuracy": None,
    }
    if scores is not None and len(class_names) > 5:
        result["top5_accuracy"] = float(skm.top_k_accuracy_score(y_true, scores, k=5, labels=labels))
    report = skm.classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names), output_dict=True, zero_division=0
    )
    result["per_class"] = {name: report[name] for name in class_names}
    result["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return result


def predictions(
    ids: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, k: int = 5
) -> Predictions:
    """Every image's prediction as parallel arrays, so two methods can be compared image by image.

    Parameters
    ----------
    ids : sequence of str
        The images' store ids, in row order.
    y_true, y_pred : array of int
    scores : array of shape (n, n_classes), optional
        Without scores the top classes are the prediction alone, with no scores.
    k : int, default=5
        How many of the best classes to keep per image (at most the number of classes).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if scores is None:
        top = y_pred[:, None]
        top_scores: list[list[float]] = [[] for _ in range(len(y_pred))]
    else:
        scores = np.asarray(scores, dtype=np.float64)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
        top_scores = [[float(f"{v:.6g}") for v in row] for row in np.take_along_axis(scores, top, axis=1)]
    return Predictions(
        ids=[str(i) for i in ids],
        true=[int(v) for v in y_true],
        predicted=[int(v) for v in y_pred],
        top_classes=top.astype(int).tolist(),
        top_scores=top_scores,
    )
