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
from featx.data.splits import SplitPlan
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

    @property
    def split_plan(self) -> SplitPlan | None:
        """The split plan it was trained under; ``None`` for a model saved before featx recorded it."""
        plan = self.meta.get("split_plan")
        return SplitPlan.from_dict(plan) if plan is not None else None

    @property
    def split_hashes(self) -> dict[str, str] | None:
        """One hash per split of the images it was trained (``train``), selected (``val``) and tested on."""
        return self.meta.get("split_hashes")

    @property
    def score_kind(self) -> str | None:
        """What :meth:`scores` returns: ``"probability"``, ``"margin"`` (decision values) or ``None`` (no scores)."""
        # hasattr is False where scikit-learn's available_if hides the method (SVC without probability=True).
        if hasattr(self.pipeline, "predict_proba"):
            return "probability"
        if hasattr(self.pipeline, "decision_function"):
            return "margin"
        return None

    def scores(self, X: np.ndarray) -> np.ndarray | None:
        """Class scores: probabilities when the estimator has them, else decision values (see :attr:`score_kind`)."""
        kind = self.score_kind
        if kind is None:
            return None
        s = np.asarray(getattr(self.pipeline, "predict_proba" if kind == "probability" else "decision_function")(X))
        if s.ndim == 1:  # binary decision_function: one column for the positive class
            s = np.stack([-s, s], axis=1)
        return _expand_scores(s, self.pipeline.classes_, len(self.class_names))

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

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a featx model file, a newer format, untrusted types without ``trust``, or a file whose pipeline or
        metadata is not what featx writes; the message names the file and what is wrong.
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
    version = obj.get("format_version", 0)
    if isinstance(version, str) and version.strip().isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _damaged(path, f"its format_version is {version!r}, not an integer")
    if version > MODEL_FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer featx (model format {version}); upgrade featx")
    return TrainedModel(_pipeline_of(path, obj, trusted=bool(untrusted)), _meta_of(path, obj))


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path}: {what}; the file is damaged or was not written by featx (write it again with `featx train`)"
    )


def _pipeline_of(path: Path, obj: dict[str, Any], trusted: bool) -> Any:
    """The file's fitted pipeline: a scikit-learn Pipeline (any object with ``predict`` for a trusted file)."""
    if "pipeline" not in obj:
        raise _damaged(path, "it has no pipeline")
    pipeline = obj["pipeline"]
    if not isinstance(pipeline, Pipeline) and not (trusted and callable(getattr(pipeline, "predict", None))):
        raise _damaged(path, f"its pipeline is a {type(pipeline).__name__}, not a fitted scikit-learn Pipeline")
    return pipeline


def _meta_of(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    """The file's metadata, checked for what applying the model needs: the store spec, the layer, the classes."""
    from featx.spec import ExtractionSpec

    if not isinstance(obj.get("meta"), str):
        raise _damaged(path, "it has no metadata" if "meta" not in obj else "its metadata is not a JSON string")
    try:
        meta = json.loads(obj["meta"])
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"its metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, "its metadata is not a JSON object")
    for key in ("store_spec", "layer", "class_names"):
        if key not in meta:
            raise _damaged(path, f"its metadata has no {key}")
    try:
        ExtractionSpec.from_dict(meta["store_spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(path, f"its store_spec is not a feature-store spec ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta["layer"], str):
        raise _damaged(path, f"its layer must be a string, not {meta['layer']!r}")
    names = meta["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _damaged(path, f"its class_names must be a list of strings, not {names!r}")
    return meta


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
