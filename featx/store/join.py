"""Joining stores: complete stores of consecutive row blocks of one manifest concatenated into one store.

The joined file has exactly the layout of a store written in one process (it is written with the same
layout helpers as :class:`~featx.store.writer.StoreWriter`), copied in bounded blocks and renamed into
place only when complete. Sharded extraction (:mod:`featx.extract.sharded`) joins its shards with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx._runtime.io import atomic_path
from featx.data.manifest import labels_fingerprint
from featx.exceptions import SpecMismatchError
from featx.spec import canonical_json
from featx.store.format import _create_layout, _finish_attrs, _text, _write_columns, _write_hdf5_guarded
from featx.store.reader import FeatureStore

__all__ = ["concatenate"]

#: Attributes every shard of one store shares, and the joined store keeps (each shard's labels fingerprint
#: covers its own rows: the joined store's is computed from the joined columns).
_SAME_IN_EVERY_SHARD = ("spec", "manifest_fingerprint", "manifest_source", "split_policy")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- joining
_COPY_BYTES = 64 << 20  # rows copied per step when joining: RAM stays bounded for any N


def concatenate(
    parts: Sequence[str | Path],
    target: str | Path,
    *,
    key: str,
    stats: dict[str, Any] | None = None,
    attrs: dict[str, str] | None = None,
) -> Path:
    """Join complete stores of consecutive row blocks of one manifest into one store, atomically.

    The result has exactly the layout of a store written in one process (features for every layer,
    ids, paths, labels, file stats, splits, class names, done flags, failures with their rows shifted,
    provenance); the parts' own extra attributes are not carried over. Features are copied in bounded
    blocks, so memory does not grow with the number of rows. ``target`` appears only when complete.

    Parameters
    ----------
    parts : sequence of str or Path
        Complete stores, in row order.
    target : str or Path
        The joined store; replaced if it exists.
    key : str
        The joined store's cache key.
    stats : dict, optional
        The joined store's ``stats`` attribute.
    attrs : dict of str to str, optional
        Extra root attributes.

    Raises
    ------
    SpecMismatchError
        The parts were made with different specs, images, class names or split policies.
    """
    if not parts:
        raise ValueError("nothing to join: no stores given")
    target = Path(target)
    stores = []
    try:
        for part in parts:
            stores.append(FeatureStore(part))
        first = stores[0]
        same = _SAME_IN_EVERY_SHARD
        for store in stores[1:]:
            diffs = [name for name in same if store.attrs.get(name) != first.attrs.get(name)]
            if store.class_names != first.class_names:
                diffs.append("class_names")
            if store.source_split_codes != first.source_split_codes:
                diffs.append("split codes")
            if store.feature_dims() != first.feature_dims():
                diffs.append("feature sizes")
            if diffs:
                raise SpecMismatchError(
                    f"cannot join {store.path.name} with {first.path.name}: they differ in {', '.join(diffs)}"
                )
        versions = [store.attrs.get("versions", "{}") for store in stores]
        if len(set(versions)) > 1:
            log.warning("the joined stores were made with different library versions; recording the first's")
        n, itemsize = sum(len(store) for store in stores), 2 if first.spec.dtype == "float16" else 4
        features = n * sum(first.feature_dims().values()) * itemsize
        columns = max(0, sum(store.path.stat().st_size for store in stores) - features)  # the parts' own columns
        extra = {"versions": versions[0], **(attrs or {})}
        with atomic_path(target, target.with_name(f".{target.name}.joining-{os.getpid()}")) as tmp:
            _write_hdf5_guarded(
                tmp,
                features,
                columns,
                lambda f, columns_next: _join_into(f, columns_next, stores, key, stats or {}, extra),
                f"joining {len(stores)} stores into {target}",
                "join again: the stores joined are kept",
            )
    finally:
        for store in stores:
            store.close()
    return target


def _join_into(
    f: h5py.File,
    columns_next: Callable[[], None],
    stores: Sequence[FeatureStore],
    key: str,
    stats: dict[str, Any],
    attrs: dict[str, str],
) -> None:
    first = stores[0]
    n = sum(len(store) for store in stores)
    offsets = np.cumsum([0] + [len(store) for store in stores])

    def column(name: str) -> np.ndarray:
        return np.concatenate([store._file[name][:] for store in stores])

    def failures(name: str) -> np.ndarray:
        return np.concatenate([store._file["failures"][name][:] for store in stores])

    datasets = _create_layout(f, first.spec, first.feature_dims(), n)
    for layer, out in datasets.items():
        step = max(1, _COPY_BYTES // (out.shape[1] * out.dtype.itemsize))
        for store, offset in zip(stores, offsets, strict=False):
            src = store._file["features"][layer]
            for start in range(0, len(store), step):
                stop = min(len(store), start + step)
                out[offset + start : offset + stop] = src[start:stop]
    ids, labels, codes = [_text(s) for s in column("ids")], column("labels"), column("split")
    names = {code: name for name, code in first.source_split_codes.items()}
    _write_columns(
        f,
        ids=ids,
        paths=[_text(s) for s in column("paths")],
        labels=labels,
        file_size=column("file_size"),
        file_mtime_ns=column("file_mtime_ns"),
        split=codes,
        split_codes=first.source_split_codes,
        class_names=first.class_names,
        done=column("done"),
        fail_rows=np.concatenate(
            [store._file["failures"]["rows"][:] + offset for store, offset in zip(stores, offsets, strict=False)]
        ),
        fail_ids=[_text(s) for s in failures("ids")],
        fail_reasons=[_text(s) for s in failures("reasons")],
    )
    _finish_attrs(
        f,
        {
            "key": key,
            **{name: first.attrs[name] for name in _SAME_IN_EVERY_SHARD if name in first.attrs},
            "labels_fingerprint": labels_fingerprint(ids, labels, [names[int(c)] for c in codes], first.class_names),
            "stats": canonical_json(stats),
            **attrs,
        },
    )
