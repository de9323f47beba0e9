"""g on cached features: scikit-learn classifiers trained, searched and saved on a feature store.

- :mod:`~featx.classify.presets`: the named classifiers and their preprocessing pipelines;
- :mod:`~featx.classify.config`: :class:`ClassifierConfig`, every setting of one training run, checked once;
- :mod:`~featx.classify.search`: the hyper-parameter search on the training rows;
- :mod:`~featx.classify.training`: search, refit, evaluate, learning curves;
- :mod:`~featx.classify.arrays`: where a fit computes (NumPy, or torch/CUDA tensors through scikit-learn's
  Array API dispatch);
- :mod:`~featx.classify.memory`: each preset's measured peak-memory estimate, and the refusal up front;
- :mod:`~featx.classify.model`: :class:`TrainedModel` and its pickle-free persistence;
- :mod:`~featx.classify.cluster`: sweeps on a Dask cluster.
"""

from featx.classify.cluster import scheduler
from featx.classify.config import ClassifierConfig
from featx.classify.model import MODEL_FORMAT, MODEL_FORMAT_VERSION, TrainedModel, check_compatible, load_model
from featx.classify.presets import (
    PRESETS,
    Preset,
    build_pipeline,
    get_preset,
    parse_preprocess,
    register_classifier,
)
from featx.classify.search import SearchResult, search
from featx.classify.training import Fitted, evaluate_model, few_shot_curve, train

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "PRESETS",
    "ClassifierConfig",
    "Fitted",
    "Preset",
    "SearchResult",
    "TrainedModel",
    "build_pipeline",
    "check_compatible",
    "evaluate_model",
    "few_shot_curve",
    "get_preset",
    "load_model",
    "parse_preprocess",
    "register_classifier",
    "scheduler",
    "search",
    "train",
]
