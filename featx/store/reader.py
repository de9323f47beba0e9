"""Reading a complete feature store: :class:`FeatureStore` selects rows by split and reads them in bounded
blocks; :func:`open_store` (``featx.store.open``) opens one, or says why it cannot (unfinished, in shards).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.data.splits import SplitPlan, split_hashes
from featx.exceptions import IncompleteStoreError, unknown
from featx.spec import canonical_json
from featx.store.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLIT_CODES,
    Failure,
    _text,
    check_consistency,
    partial_path,
    partial_progress,
    shards_path,
)

__all__ = ["FeatureStore", "open_store"]


class FeatureStore:
    """A complete feature store opened for reading (see :func:`open_store`).

    The store holds the splits its source gave; the train / val / test splits every selection uses are those of
    a :class:`~featx.data.splits.SplitPlan` applied on opening (``plan``; the default plan when ``None``), so a
    new split seed or fraction never needs new features. Row selections (``split``) default to all rows that
    hold features; failed rows are left out everywhere unless ``include_failed=True`` (their features are zeros).

    Attributes
    ----------
    plan : SplitPlan
        The split plan in force.
    split_policy : str
        How the splits came about, in words.
    split_hashes : dict of str to str
        One hash of the ids per split (:func:`featx.data.splits.split_hashes`).
    """

    def __init__(self, path: str | Path, plan: SplitPlan | None = None) -> None:
        self.path = Path(path)
        self.plan = plan or SplitPlan()
        if not self.path.is_file():
            raise _why_not_a_store(self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(
                f"{self.path} is not a readable HDF5 file ({exc}); if it is a damaged store, delete it and run "
                "the extraction again"
            ) from exc
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> None:
        attrs = self._file.attrs
        if attrs.get("featx_format") != FORMAT_NAME:
            raise ValueError(f"{self.path} is an HDF5 file but not a featx feature store")
        version = int(attrs.get("featx_format_version", 0))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{self.path} uses store format version {version}; this featx reads up to {FORMAT_VERSION}. "
                "Upgrade featx to read it"
            )
        if not attrs.get("complete", False):
            raise IncompleteStoreError(f"{self.path} was never completed; re-run the extraction that made it")
        self.attrs: dict[str, Any] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        if self.attrs.get("labels_fingerprint") == "":  # before the labels: their rewrite may have been cut mid-way
            raise IncompleteStoreError(
                f"{self.path}: an update of its labels was interrupted; re-run the `featx extract` that made it "
                "(its features are kept: only the labels are written again)"
            )
        self.spec = check_consistency(self._file, self.path)
        self.key: str = self.attrs["key"]
        self.layers: tuple[str, ...] = self.spec.layers
        self.class_names: list[str] = [s.decode() if isinstance(s, bytes) else s for s in self._file["class_names"][:]]
        self._labels = self._file["labels"][:]
        # Codes as written in the file, so a future reordering of SPLITS cannot misread old stores.
        codes = json.loads(self._file["split"].attrs.get("codes", canonical_json(SPLIT_CODES)))
        self.source_split_codes: dict[str, int] = codes  # the file's own, which a join of shards keeps
        names = {code: name for name, code in codes.items()}
        source_splits = [names[int(c)] for c in self._file["split"][:]]
        self.source_splits: dict[str, int] = {s: source_splits.count(s) for s in SPLIT_CODES if s in source_splits}
        ids = [_text(s) for s in self._file["ids"][:]]
        assigned, self.split_policy = self.plan.assign(ids, self._labels, source_splits, self.class_names)
        self.split_hashes: dict[str, str] = split_hashes(ids, assigned)
        self._split = np.array([SPLIT_CODES[s] for s in assigned], dtype=np.int8)
        self._done = self._file["done"][:]

    # -- context management
    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        f = getattr(self, "_file", None)
        if f is not None and f.id.valid:
            f.close()

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, backbone={self.spec.backbone!r}, rows={len(self)})"

    # -- selections
    @property
    def splits(self) -> dict[str, int]:
        """Rows holding features per split."""
        return {
            s: int(((self._split == c) & self._done).sum()) for s, c in SPLIT_CODES.items() if (self._split == c).any()
        }

    def rows(self, split: str | None = None, include_failed: bool = False) -> np.ndarray:
        """Row indices of a split under the plan (all splits when ``None``)."""
        mask = np.ones(len(self), dtype=bool) if include_failed else self._done.copy()
        if split is not None:
            if split not in SPLIT_CODES:
                raise unknown("split", split, SPLIT_CODES, f"Splits are {', '.join(SPLIT_CODES)}.")
            mask &= self._split == SPLIT_CODES[split]
        return np.flatnonzero(mask)

    def _layer(self, layer: str | None) -> str:
        if layer is None:
            return self.layers[0]
        if layer not in self.layers:
            raise unknown("layer of this store", layer, self.layers, f"It holds: {', '.join(self.layers)}.")
        return layer

    def features(self, layer: str | None = None, split: str | None = None, dtype: Any = None) -> np.ndarray:
        """``[n, D]`` features of one layer (the first by default) for the rows of ``split``."""
        ds = self._file["features"][self._layer(layer)]
        rows = self.rows(split)
        out = self._finite(_read_rows(ds, rows), rows, ds.name)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def labels(self, split: str | None = None) -> np.ndarray:
        """Integer labels (index into :attr:`class_names`; -1 for unlabeled rows)."""
        return self._labels[self.rows(split)]

    def ids(self, split: str | None = None) -> list[str]:
        """Row ids, aligned with :meth:`features`."""
        return [_text(s) for s in _read_rows(self._file["ids"], self.rows(split))]

    def paths(self, split: str | None = None) -> list[str]:
        """Image paths, aligned with :meth:`features`."""
        return [_text(s) for s in _read_rows(self._file["paths"], self.rows(split))]

    def read_rows(self, rows: np.ndarray, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` of the given row indices (sorted ascending), e.g. a block from :meth:`rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > 1 and np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be sorted and unique")
        ds = self._file["features"][self._layer(layer)]
        return self._finite(_read_rows(ds, rows), rows, ds.name), self._labels[rows]

    def file_stats(self, split: str | None = None, include_failed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(sizes, mtimes_ns)`` of the image files as they were when extracted, aligned with :meth:`rows`."""
        rows = self.rows(split, include_failed)
        return self._file["file_size"][:][rows], self._file["file_mtime_ns"][:][rows]

    def iter_chunks(
        self, layer: str | None = None, split: str | None = None, chunk_size: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(X, y, rows)`` blocks of at most ``chunk_size`` rows; memory stays bounded for any N."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        ds = self._file["features"][self._layer(layer)]
        rows = self.rows(split)
        for start in range(0, len(rows), chunk_size):
            block = rows[start : start + chunk_size]
            yield self._finite(_read_rows(ds, block), block, ds.name), self._labels[block], block

    def _finite(self, features: np.ndarray, rows: np.ndarray, dataset: str) -> np.ndarray:
        """``features``, after checking that every row is finite (stores of older featx may hold NaN rows).

        Raises
        ------
        ValueError
            Naming the store, the layer and the rows whose features are NaN or infinite.
        """
        finite = np.ones(len(features), dtype=bool)
        for start in range(0, len(features), _FINITE_CHECK_ROWS):  # in blocks: the mask of a block, not of all
            block = slice(start, start + _FINITE_CHECK_ROWS)
            finite[block] = np.isfinite(features[block]).all(axis=1)
        if finite.all():
            return features
        bad = rows[~finite]
        ids = [_text(s) for s in _read_rows(self._file["ids"], bad[:5])]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"{self.path}: {len(bad)} row{'s' if len(bad) > 1 else ''} of {dataset.removeprefix('/')} "
            f"hold{'' if len(bad) > 1 else 's'} non-finite "
            f"features (NaN or infinity), so no classifier can use them: rows {bad[:5].tolist()} (ids "
            f"{', '.join(repr(i) for i in ids)}){more}. An earlier featx stored them as extracted; extract the store "
            "again with --overwrite, which records such rows as failures with their reason"
        )

    @property
    def failures(self) -> list[Failure]:
        """Images that could not be extracted, with the reason."""
        fg = self._file["failures"]
        return [
            Failure(int(r), _text(i), _text(reason))
            for r, i, reason in zip(fg["rows"][:], fg["ids"][:], fg["reasons"][:], strict=True)
        ]

    def feature_dims(self) -> dict[str, int]:
        """Feature size per layer."""
        return {layer: int(self._file["features"][layer].shape[1]) for layer in self.layers}

    def info(self) -> dict[str, Any]:
        """Everything ``featx info`` shows, as a JSON-ready dict."""
        return {
            "path": str(self.path),
            "format": f"{self.attrs['featx_format']} v{self.attrs['featx_format_version']}",
            "key": self.key,
            "created_at": self.attrs.get("created_at"),
            "rows": len(self),
            "splits": self.splits,
            "classes": len(self.class_names),
            "features": {layer: f"[{len(self)}, {d}] {self.spec.dtype}" for layer, d in self.feature_dims().items()},
            "spec": self.spec.to_dict(),
            "manifest": {
                "source": self.attrs.get("manifest_source"),
                "fingerprint": self.attrs.get("manifest_fingerprint"),
                "labels_fingerprint": self.attrs.get("labels_fingerprint"),
                "source_splits": self.source_splits,
                "split_plan": self.plan.to_dict(),
                "split_policy": self.split_policy,
                "split_hashes": self.split_hashes,
            },
            "failures": len(self.failures),
            "stats": json.loads(self.attrs.get("stats", "{}")),
            "versions": json.loads(self.attrs.get("versions", "{}")),
        }


_FINITE_CHECK_ROWS = 1 << 14


def _read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read rows (sorted indices) in as few contiguous slices as possible; h5py's fancy indexing is slow."""
    if len(rows) == 0:
        return ds[0:0]
    if rows[-1] - rows[0] + 1 == len(rows):
        return ds[int(rows[0]) : int(rows[-1]) + 1]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    if len(breaks) < 64:
        return np.concatenate([ds[int(run[0]) : int(run[-1]) + 1] for run in np.split(rows, breaks)])
    # Scattered rows (a random split): read the covering range window by window and keep the wanted rows.
    pieces, window = [], 8192
    for start in range(int(rows[0]), int(rows[-1]) + 1, window):
        wanted = rows[(rows >= start) & (rows < start + window)]
        if len(wanted):
            pieces.append(ds[start : min(start + window, int(rows[-1]) + 1)][wanted - start])
    return np.concatenate(pieces)


def _why_not_a_store(path: Path) -> Exception:
    """The error for a ``path`` that is no store file: an unfinished store, or its work folder (both say how to
    resume), one in shards not joined yet, some other folder, or nothing."""
    for suffix in (".partial", ".shards"):  # the work folder of STORE.h5 rather than STORE.h5 itself
        if path.name.endswith(suffix) and path.name != suffix and path.is_dir():
            store = path.with_name(path.name.removesuffix(suffix))
            if store.is_file():
                return IsADirectoryError(f"{path} is a work folder of {store}, not a feature store: open {store}")
            path = store
    progress = partial_progress(path)
    if progress is not None or partial_path(path).is_dir():
        done, failed, total = progress or (0, 0, "its")
        return IncompleteStoreError(
            f"{path} is not finished: {done + failed} of {total} images processed so far. The extraction was "
            "interrupted or is still running; re-run the same `featx extract` command to resume it (deleting "
            f"{partial_path(path)} would discard the rows already extracted)"
        )
    if shards_path(path).is_dir():
        return IncompleteStoreError(
            f"{path} is being extracted in shards that are not joined yet (see {shards_path(path)}); when every "
            f"shard is done, `featx join {path}` joins them"
        )
    if path.is_dir():
        return IsADirectoryError(f"{path} is a folder, not a feature store (a featx store is one .h5 file)")
    return FileNotFoundError(f"feature store {str(path)!r} does not exist")


def open_store(path: str | Path, plan: SplitPlan | None = None) -> FeatureStore:
    """Open a complete feature store for reading (also importable as ``featx.store.open``).

    Parameters
    ----------
    path : str or Path
    plan : SplitPlan, optional
        The split plan its selections use (the default plan when ``None``).

    Raises
    ------
    IncompleteStoreError
        The store's extraction was interrupted (or is still running); the message says how to resume.
    FileNotFoundError
        No store and no partial job at ``path``.
    IsADirectoryError
        ``path`` is a folder (the work folder of a complete store, say), not a store.

    Examples
    --------
    >>> from featx.store import open_store
    >>> with open_store("digits.h5") as store:  # doctest: +SKIP
    ...     X, y = store.features(split="train"), store.labels(split="train")
    """
    return FeatureStore(path, plan)


#: :func:`open_store` under the name users call it by (``featx.store.open``). Left out of ``__all__``, so that
#: ``from featx.store import *`` does not shadow the builtin ``open``.
open = open_store
