"""Extraction: a manifest batch-embedded by a backbone into an HDF5 feature store.

- :mod:`~featx.extract.api`: :func:`extract`, the one entry point (options checked, spec built, cache looked up);
- :mod:`~featx.extract.engine`: the batch loop (decoding workers, the network, the store writer);
- :mod:`~featx.extract.sharded`: one shard per torchrun rank, and joining them.
"""

from featx._runtime.device import resolve_device
from featx.extract.api import default_store_path, extract
from featx.extract.engine import COMPILE_MODES, ExtractionResult, MaxFailures
from featx.spec import ExtractionOptions

__all__ = [
    "COMPILE_MODES",
    "ExtractionOptions",
    "ExtractionResult",
    "MaxFailures",
    "default_store_path",
    "extract",
    "resolve_device",
]
