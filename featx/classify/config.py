"""Every setting of one classifier run, in one frozen dataclass whose fields are its option table, checked once
when it is built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featx._runtime.params import SEED_MAX, Choices, Constraint, Flag, Interval, Items, Text, check_options, option

if TYPE_CHECKING:
    from featx.classify.presets import Preset
from featx.exceptions import InvalidOptionError, unknown

__all__ = ["ClassifierConfig", "TrainRun"]


class _Params(Constraint):
    """Keyword parameters of an estimator: ``(name, value)`` pairs with distinct string names."""

    def allows(self, value: Any) -> bool:
        return (
            isinstance(value, tuple)
            and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and p[0] for p in value)
            and len({p[0] for p in value}) == len(value)
        )

    def words(self) -> str:
        return "a table of the estimator's keyword arguments, e.g. params = {max_iter = 2000}"

    def from_text(self, text: str) -> Any:
        raise ValueError(text)  # the command line gives them as repeated --param NAME=VALUE


# --------------------------------------------------------------------------------------------- train
_POSITIVE = Interval(False, 0, None, "neither")


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that defines one classifier cell (and its cache identity in pipelines), checked when built.

    Each option's allowed values, default and help are in its field (:func:`featx._runtime.params.option`): the
    CLI's options and the pipelines' ``[[classifiers]]`` keys are generated from them. Building a config
    checks every option, then what depends on the classifier (its hyper-parameter, its estimator's parameters,
    class weights, out-of-core training); no caller checks them again.

    Parameters
    ----------
    classifier : str, default="svm"
        A preset name or an import path of a scikit-learn classifier.
    value : float or "auto", default="auto"
        The searched hyper-parameter (C, alpha, k); ``auto`` searches ``grid``.
    grid : tuple of float, optional
        Overrides the preset's grid.
    preprocess : tuple of str, optional
        Steps before the estimator; by default the preset's (``standard``; ``l2`` for svm and knn; none for chance).
    cv : int, default=5
    class_weight : {None, "balanced"}
    scoring : {"accuracy", "balanced_accuracy"}
    params : tuple of (str, value) pairs
        Extra keyword parameters of the estimator (a dict is accepted and stored sorted).
    layer : str, optional
        The store layer (its first by default).
    seed : int, default=0
    out_of_core : bool, default=False
        ``sgd`` only: stream the store in shuffled blocks through ``partial_fit`` (bounded memory); the
        hyper-parameter is chosen on the val split, or on a seeded 10 % hold-out of train.
    """

    classifier: str = option(
        "svm",
        Text("svm, sklearn.svm.LinearSVC", "a preset name or an import path"),
        help="svm, logreg, sgd, ridge, knn, chance, or an import path such as sklearn.svm.SVC.",
        flags=("--classifier", "-c"),
    )
    value: float | str = option(
        "auto",
        Choices(("auto",)),
        _POSITIVE,
        help="The preset's hyper-parameter (C, alpha, k): auto (search it on val) or a value.",
        flags=(),  # the command line names it after the preset's parameter: --C, --alpha, --neighbors
    )
    grid: tuple[float, ...] | None = option(
        None,
        None,
        Items(_POSITIVE, low=1, example="0.01,0.1,1,10"),
        help="Search grid, e.g. 0.01,0.1,1,10 [default: the preset's].",
        show_default=False,
    )
    preprocess: tuple[str, ...] | None = option(
        None,
        None,
        Items(Text("l2, standard, pca:256, none", "a step")),
        # Written out, not read from PRESETS (importing scikit-learn costs a second); a test keeps it true.
        help="Comma-separated steps: l2, standard, pca:K, none [default: the preset's: svm: l2, logreg: standard, "
        "sgd: standard, ridge: standard, knn: l2, chance: none; standard for an import path].",
        show_default=False,
    )
    cv: int = option(5, Interval(True, 2), help="Folds of the stratified CV (used when there is no val split).")
    class_weight: str | None = option(
        None, None, Choices(("balanced",)), help="Weight classes by inverse frequency.", show_default=False
    )
    scoring: str = option(
        "accuracy", Choices(("accuracy", "balanced_accuracy")), help="What chooses the hyper-parameter on val."
    )
    params: tuple[tuple[str, Any], ...] = option(
        (),
        _Params(),
        help="Extra estimator parameters NAME=VALUE (repeat the option for several).",
        flags=(),  # the command line's --param NAME=VALUE, repeated
    )
    layer: str | None = option(
        None,
        None,
        Text("penultimate", "a layer name"),
        help="Store layer to train on [default: its first].",
        pipeline=False,
    )
    seed: int = option(
        0, Interval(True, 0, SEED_MAX), help="Training seed (the estimator's random_state).", pipeline=False
    )
    out_of_core: bool = option(
        False, Flag(), help="sgd only: stream the store through partial_fit in shuffled blocks (bounded memory)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.params, Mapping):
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))
        check_options(self)
        self._check_with_preset()

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (the cache identity of a pipeline cell, and part of the results)."""
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

    def identity(self) -> dict[str, Any]:
        """What makes two classifier runs on the same features and split plan the same: the settings, the
        preprocessing in force (a preset's default is not in the settings, and a changed default must count) and
        the search's version (:data:`featx.classify.search.SEARCH_VERSION`)."""
        from featx.classify.search import SEARCH_VERSION

        return {"config": self.to_dict(), "preprocess_in_force": self.steps(), "search_version": SEARCH_VERSION}

    @property
    def preset(self) -> Preset:
        """The preset (or the import path's classifier) this config trains."""
        from featx.classify.presets import get_preset  # scikit-learn, loaded when a config is built, not imported

        return get_preset(self.classifier)

    def steps(self, preset: Preset | None = None) -> list[str]:
        """The preprocessing steps in force: the configured ones, else the preset's default."""
        from featx.classify.presets import parse_preprocess

        preset = self.preset if preset is None else preset
        return parse_preprocess(self.preprocess if self.preprocess is not None else preset.preprocess)

    def _check_with_preset(self) -> None:
        """What an option allows that depends on the classifier (checked once, when the config is built)."""
        preset = self.preset
        try:
            self.steps(preset)
        except ValueError as exc:
            raise InvalidOptionError("preprocess", str(exc)) from None
        if self.value != "auto" and not preset.param:
            raise InvalidOptionError("value", f"{preset.name} has no C or alpha to set")
        if self.params:
            known = preset.build(None, 0, None).get_params(deep=False)
            for name, _ in self.params:
                if name not in known:
                    raise unknown(
                        f"{preset.name} parameter",
                        name,
                        known,
                        f"Its parameters: {', '.join(sorted(known))}.",
                        "params",
                    )
        if self.out_of_core:
            if preset.name != "sgd":
                raise InvalidOptionError(
                    "out_of_core", "out-of-core training streams store chunks through partial_fit: use --classifier sgd"
                )
            if self.class_weight is not None:
                raise InvalidOptionError(
                    "class_weight", "out-of-core training cannot weight classes (partial_fit has no class_weight)"
                )
            if set(self.steps(preset)) - {"l2", "standard"}:
                raise InvalidOptionError(
                    "preprocess", "out-of-core training supports the l2 and standard preprocessing steps only"
                )
        if self.class_weight and not preset.supports_class_weight:
            raise InvalidOptionError(
                "class_weight", f"classifier {preset.name} has no class_weight; drop --class-weight"
            )


class _Shot(Constraint):
    """A learning curve's point: a positive number of images per class, or ``all``."""

    metavar = "K|all"

    def allows(self, value: Any) -> bool:
        return value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0)

    def words(self) -> str:
        return "a positive integer (images per class) or all"

    def from_text(self, text: str) -> Any:
        return "all" if text == "all" else int(text)


@dataclass(frozen=True)
class TrainRun:
    """How :func:`~featx.classify.train` runs a config, beside what it trains: parallel jobs and the learning
    curve's points and draws. Checked when built, like the config.

    Parameters
    ----------
    n_jobs : int, default=-1
        Parallel jobs of the search; -1 all cores (joblib's convention: -2 all but one, 0 is no count).
    shots : tuple of int or "all", optional
        Learning-curve points: images per class.
    draws : int, default=5
        Seeded draws per point.
    """

    n_jobs: int = option(
        -1,
        Interval(True, None, -1),
        Interval(True, 1),
        help="Parallel jobs for the search (-1: all cores).",
        flags=("--jobs", "-j"),
        pipeline=False,
    )
    shots: tuple[int | str, ...] | None = option(
        None,
        None,
        Items(_Shot(), low=1, example="1,2,5,10,all"),
        help="Learning curve: images per class, e.g. 1,2,5,10,all.",
        show_default=False,
    )
    draws: int = option(5, Interval(True, 1), help="Seeded draws per shot count.")

    def __post_init__(self) -> None:
        check_options(self)
