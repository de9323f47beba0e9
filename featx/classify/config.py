"""Every setting of one classifier run, in one frozen dataclass checked once (:meth:`ClassifierConfig.validate`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from featx.classify.presets import Preset, get_preset, parse_preprocess

__all__ = ["ClassifierConfig"]


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
        Steps before the estimator; by default the preset's (``standard``; ``l2`` for svm and knn; none for chance).
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

    def steps(self, preset: Preset) -> list[str]:
        """The preprocessing steps in force: the configured ones, else the preset's default."""
        return parse_preprocess(self.preprocess if self.preprocess is not None else preset.preprocess)

    def validate(self) -> Preset:
        """Check every field (before any data is read); returns the preset."""
        self._check_types()
        preset = get_preset(self.classifier)
        self.steps(preset)
        if self.cv < 2:
            raise ValueError(f"cv must be an integer of at least 2 folds, got {self.cv}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight {self.class_weight!r}: use balanced or leave it out")
        if self.scoring not in ("accuracy", "balanced_accuracy"):
            raise ValueError(f"scoring {self.scoring!r}: use accuracy or balanced_accuracy")
        if self.value != "auto":
            if not preset.param:
                raise ValueError(f"{preset.name} has no C or alpha to set")
            if not _is_number(self.value) or self.value <= 0:
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

    def _check_types(self) -> None:
        """Each field of the type it must have (a pipeline file can hold anything), before its value is checked."""
        if not isinstance(self.classifier, str) or not self.classifier:
            raise ValueError(
                f"classifier must be a preset name or an import path (e.g. svm, sklearn.svm.LinearSVC), "
                f"got {self.classifier!r}"
            )
        if not _is_int(self.cv):
            raise ValueError(f"cv must be an integer of at least 2 folds, got {self.cv!r}")
        if self.grid is not None and not (isinstance(self.grid, tuple | list) and all(map(_is_number, self.grid))):
            raise ValueError(f"grid must be a list of positive numbers, e.g. grid = [0.1, 1, 10], got {self.grid!r}")
        steps = self.preprocess
        if steps is not None and not (isinstance(steps, str) or all(isinstance(s, str) for s in _items(steps))):
            raise ValueError(f"preprocess must be a list of steps (l2, standard, pca:K, none), got {steps!r}")
        params = self.params
        if not isinstance(params, dict) and not all(isinstance(p, tuple) and len(p) == 2 for p in _items(params)):
            raise ValueError(
                f"params must be a table of the estimator's keyword arguments, e.g. params = {{max_iter = 2000}}, "
                f"got {params!r}"
            )
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"layer must be a layer name, got {self.layer!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.out_of_core, bool):
            raise ValueError(f"out_of_core must be true or false, got {self.out_of_core!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _items(value: Any) -> tuple:
    """``value``'s items when it is a list or tuple; a non-item otherwise (so the check refuses it)."""
    return tuple(value) if isinstance(value, tuple | list) else (None,)
