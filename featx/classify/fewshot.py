"""Learning curves on cached features: test accuracy with k training images per class, tuned inside each k-shot set."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from featx.classify._rows import labelled_rows
from featx.classify.config import ClassifierConfig
from featx.classify.presets import Preset, build_pipeline
from featx.classify.search import cv_folds, fit_quietly, search
from featx.results import FewShotPoint
from featx.store.reader import FeatureStore

__all__ = ["ONE_SHOT_VALUE", "drawable_shots", "few_shot_curve", "shot_rows"]

log = logging.getLogger(__name__)


def drawable_shots(
    y_train: np.ndarray, class_names: Sequence[str], shots: Sequence[int | str], where: object
) -> list[int | str]:
    """The learning-curve points that can be drawn from ``y_train``: ``"all"`` and every k up to the training
    images of the smallest class. The others are left out with a warning naming that class, since their draws
    would not hold k images of it (and past the largest class, every draw would be the same images).

    Raises
    ------
    ValueError
        When no point is left, naming the smallest class and its count.
    """
    labelled = y_train[y_train >= 0]
    if not len(labelled):
        return list(shots)
    classes, counts = np.unique(labelled, return_counts=True)
    smallest = int(counts.min())
    name = class_names[int(classes[counts.argmin()])]
    kept = [k for k in shots if k == "all" or int(k) <= smallest]
    left_out = [k for k in shots if k not in kept]
    why = f"class {name!r} has {smallest} training image{'s' if smallest > 1 else ''}"
    if not kept:
        raise ValueError(
            f"{where}: no learning-curve point can be drawn from shots {list(shots)}: {why}, so at most "
            f"{smallest} per class; use shots up to {smallest}, or 'all'"
        )
    if left_out:
        log.warning(
            "%s: learning-curve point%s %s left out: %s, so more per class cannot be drawn (the draws would repeat "
            "the same images); kept %s",
            where,
            "s" if len(left_out) > 1 else "",
            ", ".join(map(str, left_out)),
            why,
            ", ".join(map(str, kept)),
        )
    return kept


#: The hyper-parameter of a 1-shot training set, where no cross-validation is possible (a stated fixed value).
ONE_SHOT_VALUE = 1.0


def shot_rows(y: np.ndarray, shots: Sequence[int | str], draws: int, seed: int) -> dict[int | str, list[np.ndarray]]:
    """The training rows of each learning-curve point, per draw: nested, so a draw's k-shot rows hold its
    smaller draws' rows (one seeded permutation per class and draw, cut at k)."""
    classes = np.unique(y)
    orders = [
        [np.random.default_rng([seed, d]).permutation(np.flatnonzero(y == c)) for c in classes] for d in range(draws)
    ]
    out: dict[int | str, list[np.ndarray]] = {}
    for k in shots:
        if k == "all":
            out[k] = [np.arange(len(y))]
        else:
            out[k] = [np.sort(np.concatenate([order[: int(k)] for order in per_class])) for per_class in orders]
    return out


def _shot_value(X, y, k, preset: Preset, preprocess, config: ClassifierConfig) -> tuple[float | None, str]:
    """The hyper-parameter of one k-shot training set, chosen inside it (k-fold CV), or fixed for k = 1."""
    if not preset.param:
        return None, "none"
    if int(np.bincount(y)[np.unique(y)].min()) < 2:
        fixed = min(ONE_SHOT_VALUE, len(y)) if preset.param == "n_neighbors" else ONE_SHOT_VALUE
        return fixed, f"fixed {preset.param}={fixed:g} (one image per class)"
    folds, scheme = cv_folds(y, np.array(["train"] * len(y)), min(config.cv, int(k)), config.seed)
    params = dict(config.params)
    grid = config.grid or preset.grid
    base = build_pipeline(preset, grid[0], preprocess, config.seed, config.class_weight, params)
    return search(base, preset, grid, X, y, folds, scheme, 1, config.scoring).best, scheme


def few_shot_curve(
    store: FeatureStore,
    preset: Preset,
    value: float | None,
    preprocess: Sequence[str],
    config: ClassifierConfig,
    shots: Sequence[int | str],
    draws: int,
    layer: str,
) -> list[FewShotPoint]:
    """Test accuracy with k training images per class: mean and 95 % CI over nested, seeded draws.

    At each k the hyper-parameter is chosen again inside the k-shot training set, by stratified CV with
    ``min(cv, k)`` folds; with one image per class it is the stated :data:`ONE_SHOT_VALUE` (k-NN: 1).
    ``"all"`` is the full train split with ``value``, the model's own choice. Draws are nested: a draw's
    k-shot rows contain its smaller k-shot rows (:func:`shot_rows`).
    """
    from scipy import stats

    X, y, splits = labelled_rows(store, layer)
    X, y = X[splits == "train"], y[splits == "train"]  # SELECTION_RULE: val images are never fitted
    Xt, yt = store.features(layer, split="test", dtype=np.float32), store.labels("test")
    curve = []
    for k, row_sets in shot_rows(y, shots, draws, config.seed).items():
        accs, values, selection = [], [], ""
        for idx in row_sets:
            if len(np.unique(y[idx])) < 2:
                continue
            v, selection = (
                (value, "the model's choice")
                if k == "all"
                else _shot_value(X[idx], y[idx], k, preset, preprocess, config)
            )
            pipe = build_pipeline(preset, v, preprocess, config.seed, config.class_weight, dict(config.params))
            if preset.param == "n_neighbors":
                pipe.set_params(clf__n_neighbors=min(int(v or 5), len(idx)))
            fit_quietly(pipe, X[idx], y[idx])
            accs.append(float((pipe.predict(Xt) == yt).mean()))
            values.append(v)
        if accs:
            mean = float(np.mean(accs))
            half = (
                float(stats.t.ppf(0.975, len(accs) - 1) * np.std(accs, ddof=1) / np.sqrt(len(accs)))
                if len(accs) > 1
                else 0.0
            )
            curve.append(
                FewShotPoint(
                    shots=k,
                    draws=len(accs),
                    mean=mean,
                    std=float(np.std(accs)),
                    accuracies=accs,
                    ci95=[mean - half, mean + half],
                    values=values,
                    selection=selection,
                )
            )
    return curve
