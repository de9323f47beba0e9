"""The HDF5 feature store: one file per (images x backbone x layers x preprocessing), describing itself.

- :mod:`~featx.store.format`: the layout and its attributes, shared by every writer;
- :mod:`~featx.store.writer`: the crash-safe, resumable, single-writer :class:`StoreWriter`;
- :mod:`~featx.store.reader`: :class:`FeatureStore` and :func:`open_store` (also ``featx.store.open``);
- :mod:`~featx.store.join`: several stores concatenated into one.
"""

from featx.store.format import FORMAT_NAME, FORMAT_VERSION, partial_path, read_key, shards_path
from featx.store.join import concatenate
from featx.store.reader import FeatureStore, open_store
from featx.store.reader import open as open  # the old name, kept out of __all__ (it would shadow the builtin)
from featx.store.writer import StoreWriter, check_replaceable

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreWriter",
    "check_replaceable",
    "concatenate",
    "open_store",
    "partial_path",
    "read_key",
    "shards_path",
]
