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

import importlib

from featx.classify.config import ClassifierConfig, TrainRun

# The rest imports scikit-learn: loaded on first use, so `featx --help` and the CLI's defaults stay fast.
_LAZY = {
    "MODEL_FORMAT": "featx.classify.model",
    "MODEL_FORMAT_VERSION": "featx.classify.model",
    "TrainedModel": "featx.classify.model",
    "check_compatible": "featx.classify.model",
    "load_model": "featx.classify.model",
    "PRESETS": "featx.classify.presets",
    "Preset": "featx.classify.presets",
    "build_pipeline": "featx.classify.presets",
    "get_preset": "featx.classify.presets",
    "parse_preprocess": "featx.classify.presets",
    "register_classifier": "featx.classify.presets",
    "SearchResult": "featx.classify.search",
    "search": "featx.classify.search",
    "Fitted": "featx.classify.training",
    "evaluate_model": "featx.classify.training",
    "few_shot_curve": "featx.classify.training",
    "train": "featx.classify.training",
    "scheduler": "featx.classify.cluster",
}

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "PRESETS",
    "ClassifierConfig",
    "Fitted",
    "Preset",
    "SearchResult",
    "TrainRun",
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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx.classify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
