"""The named classifiers (``svm``, ``logreg``, ``sgd``, ``ridge``, ``knn``, ``chance``) and their preprocessing.

A :class:`Preset` says how to build the estimator for one value of its hyper-parameter, which grid to search
and whether it can warm-start along that grid; :func:`build_pipeline` puts the preprocessing steps (``l2``,
``standard``, ``pca``) in front of it so they are fitted inside each fold. Any scikit-learn classifier can
be named by import path, or registered with :func:`register_classifier`.

``chance`` is the floor of every comparison: it predicts the most frequent class of the training split for
every image (its accuracy is that class's share of the test split), with no hyper-parameter and no
preprocessing; with the no-transfer backbone ``featx:pixels`` it shows what a row's features buy.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, is_classifier
from sklearn.pipeline import Pipeline

from featx.exceptions import InvalidOptionError, UnknownNameError, unknown

__all__ = ["PRESETS", "Preset", "build_pipeline", "get_preset", "parse_preprocess", "register_classifier"]


# ------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A named classifier: how to build it, and which hyper-parameter to search over which grid.

    Parameters
    ----------
    name : str
    param : str
        The searched hyper-parameter (``C``, ``alpha``, ``n_neighbors``); ``""`` for a classifier without one
        (``chance``), which is fitted once and never searched.
    grid : tuple of float
        Default search grid, in the order searched (warm starts go along it); empty without a ``param``.
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

    # The dual solver by default: sklearn's "auto" picks the primal when n > D, which on standardised CNN features
    # took 50x longer at moderate C (digits / EfficientNet-Lite0, C=0.1: 110 s against 2 s), and on L2-normalised
    # CIFAR-10 features 4x longer at C=1 (benchmarks/RESULTS.md, issue 13). --param dual=false selects the primal.
    return LinearSVC(
        C=C,
        dual=extra.pop("dual", True),
        max_iter=extra.pop("max_iter", 5000),
        random_state=seed,
        class_weight=class_weight,
        **extra,
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


def _chance(value, seed, class_weight, **extra):
    """The majority class of train for every image; ties go to the first class (``DummyClassifier``'s argmax).
    Its ``predict_proba`` is 1 for that class and 0 for the others, so its results carry scores like any row's."""
    from sklearn.dummy import DummyClassifier

    return DummyClassifier(strategy="most_frequent", **extra)


_LOG_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))


register_classifier(
    Preset(
        "svm",
        "C",
        _LOG_GRID,
        _svm,
        description="LinearSVC (squared hinge, one-vs-rest) on L2-normalised features",
        # l2, not standard: 2-50x faster to search (issue 13), and chosen on val: digits 0.923 against 0.885 val
        # accuracy, hymenoptera tied (benchmarks/RESULTS.md, issue 24).
        preprocess=("l2",),
    )
)


register_classifier(
    Preset(
        "logreg",
        "C",
        _LOG_GRID,
        _logreg,
        warm_start=True,
        description="multinomial logistic regression (lbfgs), warm-started along the C grid",
        # The default preprocessing (standard) is chosen on val: digits 0.906 against l2's 0.885 val accuracy,
        # hymenoptera tied (benchmarks/RESULTS.md, issue 24).
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


register_classifier(
    Preset(
        "chance",
        "",
        (),
        _chance,
        supports_class_weight=False,
        description="the majority class of train for every image (DummyClassifier), the chance baseline",
        preprocess=(),
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
    estimator = cls()
    if not is_classifier(estimator):  # a regressor or clusterer would fit, then fail (or mislead) on the labels
        raise InvalidOptionError(
            "classifier",
            f"{path} is not a classifier (scikit-learn tags it as a {_estimator_kind(estimator)}); give a "
            f"classifier such as sklearn.svm.SVC, or a preset: {', '.join(PRESETS)}",
        )
    params = estimator.get_params()
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


def _estimator_kind(estimator: BaseEstimator) -> str:
    from sklearn.base import is_regressor

    return "regressor" if is_regressor(estimator) else "non-classifier estimator"


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
    steps.append(("clf", preset.build(value, seed, class_weight, **dict(params or {}))))
    return Pipeline(steps)
