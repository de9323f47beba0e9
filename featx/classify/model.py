"""A trained classifier and its file: the fitted pipeline plus what applying it needs, saved without pickle.

:class:`TrainedModel` is written as a skops file that records the store spec it was trained on;
:func:`load_model` loads only trusted types, and :func:`check_compatible` refuses features made differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featx._runtime.io import atomic_write
from featx.exceptions import SpecMismatchError
from featx.spec import canonical_json, spec_differences, with_defaults
from featx.store.reader import FeatureStore

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "TrainedModel", "check_compatible", "load_model"]


MODEL_FORMAT = "featx.model"


MODEL_FORMAT_VERSION = 1


# sklearn types that skops does not trust by default but that the presets need (k-NN's search trees).
_SAFE_EXTRA_TYPES = (
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
)


@dataclass
class TrainedModel:
    """A fitted pipeline with everything needed to apply it safely later."""

    pipeline: Pipeline
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        """The class names, in the order of the class indices the model predicts."""
        return self.meta["class_names"]

    @property
    def layer(self) -> str:
        """The store layer the model was trained on."""
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
        """Class indices (into :attr:`class_names`) of feature rows ``X``."""
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
