"""featx: frozen convnet features, cached with provenance, for transfer learning on images.

The stages, each its own sub-package, in the order of the flow:

- :mod:`featx.data` turns an image source into a :class:`~featx.data.Manifest`;
- :mod:`featx.backbones` resolves ``SOURCE:NAME[.TAG]`` into a pretrained network and its preprocessing;
- :mod:`featx.extract` batch-embeds a manifest into an HDF5 feature store (:func:`featx.extract.extract`);
- :mod:`featx.store` reads and writes those stores (:func:`open_store`);
- :mod:`featx.classify` trains scikit-learn classifiers on stored features (:func:`train`);
- :mod:`featx.finetune` fine-tunes the backbone itself (:func:`featx.finetune.finetune`);
- :mod:`featx.jobs` runs ``pipelines/*.toml`` as cached batch jobs (:func:`run`);
- :class:`ConvNetFeatures` is a scikit-learn transformer from image paths to features.

Every public error is in :mod:`featx.exceptions` and importable from here. The entry points are imported on
first use, so ``import featx`` loads neither torch nor scikit-learn. ``extract`` and ``finetune`` name
sub-packages here; their functions are ``featx.extract.extract`` and ``featx.finetune.finetune``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from featx.exceptions import (
    ArchiveError,
    DamagedFileError,
    DiskFullError,
    ImageDecodeError,
    IncompleteStoreError,
    InsufficientMemoryError,
    InvalidOptionError,
    JobError,
    NotResultsError,
    NotWritableError,
    ResultsError,
    SpecMismatchError,
    StoreError,
    StoreLockedError,
    UnknownNameError,
    UnknownOptionError,
)
from featx.spec import ExtractionOptions, ExtractionSpec, Preprocessing

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from featx.classify.model import load_model
    from featx.classify.training import train
    from featx.jobs.runner import run
    from featx.predict import predict_images
    from featx.sklearn import ConvNetFeatures
    from featx.store.reader import open_store

# Imported on first use: each pulls in torch or scikit-learn, which `import featx` should not.
_LAZY = {
    "ConvNetFeatures": "featx.sklearn",
    "load_model": "featx.classify.model",
    "open_store": "featx.store.reader",
    "predict_images": "featx.predict",
    "run": "featx.jobs.runner",
    "train": "featx.classify.training",
}
_SUBPACKAGES = ("backbones", "classify", "data", "extract", "finetune", "jobs", "metrics", "results", "store")

__all__ = [
    "ArchiveError",
    "ConvNetFeatures",
    "DamagedFileError",
    "DiskFullError",
    "ExtractionOptions",
    "ExtractionSpec",
    "ImageDecodeError",
    "IncompleteStoreError",
    "InsufficientMemoryError",
    "InvalidOptionError",
    "JobError",
    "NotResultsError",
    "NotWritableError",
    "Preprocessing",
    "ResultsError",
    "SpecMismatchError",
    "StoreError",
    "StoreLockedError",
    "UnknownNameError",
    "UnknownOptionError",
    "__version__",
    "load_model",
    "open_store",
    "predict_images",
    "run",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:  # `import featx; featx.extract.extract(...)` works without importing the sub-package
        return importlib.import_module(f"featx.{name}")
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})
