"""The HDF5 feature store: format, crash-safe writing, locking, and reading.

Layout of a finished ``STORE.h5``::

    /features/<layer>   [N, D] float32|float16, chunked along N
    /ids, /paths        [N] UTF-8 strings, aligned row by row with the features
    /labels             [N] int64 (-1 = unlabeled)
    /file_size, /file_mtime_ns  [N] int64: each image file as it was extracted (-1 = missing)
    /split              [N] int8 codes, attribute ``codes`` maps names to codes
    /class_names        [C] UTF-8 strings
    /done               [N] bool: the row holds features (False = the image failed)
    /failures/{rows,ids,reasons}
    attributes: featx_format, featx_format_version, complete, key, spec (canonical JSON),
                manifest_fingerprint, manifest_source, split_policy, versions, created_at, stats

Crash safety: while a job runs, each finished batch is written as one small ``.npz`` part into
``STORE.h5.partial/`` (temporary file, fsync, atomic rename). The HDF5 file is assembled from the parts
only at the end, written under a temporary name and renamed into place, so a store that exists is
complete; a job killed at any moment leaves parts that the next run with the same key resumes from.
One writer at a time: the ``.partial`` folder holds an advisory lock.

A store extracted in shards (:mod:`featx.distributed`) keeps them in ``STORE.h5.shards/`` until they are
joined with :func:`concatenate` into an ordinary store like the one above.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx._env import library_versions
from featx._errors import IncompleteStoreError, SpecMismatchError, StoreLockedError, unknown
from featx._io import atomic_write, fsync_dir
from featx.data import SPLITS, Manifest
from featx.spec import ExtractionSpec, canonical_json, spec_differences

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreWriter",
    "check_replaceable",
    "concatenate",
    "open",
    "partial_path",
    "read_key",
    "shards_path",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "featx.feature-store"
FORMAT_VERSION = 1
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_CHUNK_BYTES = 1 << 20  # ~1 MiB HDF5 chunks: large enough for throughput, small enough for partial reads


def partial_path(path: str | Path) -> Path:
    """The folder holding an unfinished store's parts and lock."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def shards_path(path: str | Path) -> Path:
    """The folder holding the shard stores of a sharded extraction, until they are joined."""
    path = Path(path)
    return path.with_name(path.name + ".shards")


# ------------------------------------------------------------------------------------------- locking
class _Lock:
    """An exclusive advisory lock on a file; released by the OS if the process dies (even ``kill -9``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None

    def acquire(self) -> None:
        import fcntl  # POSIX only; featx's writers run on Linux and macOS

        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StoreLockedError(
                f"another featx process ({holder}) is writing {self.path.parent.name.removesuffix('.partial')}; "
                "wait for it to finish (re-running afterwards is a cache hit) or write to another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        self._fh = fh

    def still_ours(self) -> bool:
        """False if the lock file was removed (and maybe recreated) after we opened it."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None


# ------------------------------------------------------------------------------------------- writing
def read_key(path: str | Path) -> str | None:
    """The cache key of a complete store, or ``None`` if ``path`` is no complete featx store."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("featx_format") != FORMAT_NAME or not f.attrs.get("complete", False):
                return None
            return str(f.attrs["key"])
    except (OSError, KeyError):
        return None


def check_replaceable(
    path: str | Path, key: str, spec: ExtractionSpec, manifest_fingerprint: str, overwrite: bool = False
) -> bool:
    """Whether ``path`` already holds the complete store with ``key`` (then there is nothing to do).

    Raises
    ------
    SpecMismatchError
        ``path`` holds something else (another spec, other images, or no featx store at all) and
        ``overwrite`` is False; the message names what differs.
    """
    path = Path(path)
    if not path.exists():
        return False
    if read_key(path) == key:
        return True
    if not overwrite:
        raise SpecMismatchError(_mismatch_message(path, spec, manifest_fingerprint))
    return False


class StoreWriter:
    """Write one store crash-safely and resumably; use as a context manager.

    Parameters
    ----------
    path : str or Path
        The final ``.h5`` path.
    spec : ExtractionSpec
        How the features are made.
    key : str
        The cache key (:func:`featx.spec.cache_key`).
    manifest : Manifest
        The rows, in order.
    manifest_fingerprint : str
        As used for the key.
    dims : dict of str to int
        Feature size per layer.
    overwrite : bool, default=False
        Discard an existing store or partial job made with another spec instead of refusing.
    attrs : dict of str to str, optional
        Extra root attributes for the finished file (a shard's place in its job, for instance).

    Examples
    --------
    >>> with StoreWriter(path, spec, key, manifest, fp, dims) as w:  # doctest: +SKIP
    ...     for rows in batches(w.pending_rows()):
    ...         w.write_batch(rows, feats, failures)
    ...     w.finalize(stats)
    """

    def __init__(
        self,
        path: str | Path,
        spec: ExtractionSpec,
        key: str,
        manifest: Manifest,
        manifest_fingerprint: str,
        dims: dict[str, int],
        overwrite: bool = False,
        attrs: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.spec = spec
        self.key = key
        self.manifest = manifest
        self.manifest_fingerprint = manifest_fingerprint
        self.dims = dict(dims)
        self.overwrite = overwrite
        self.attrs = dict(attrs or {})
        self.workdir = partial_path(self.path)
        self._lock: _Lock | None = None
        self._next_part = 0
        self._done = np.zeros(len(manifest), dtype=bool)
        self._failed: dict[int, str] = {}

    # -- lifecycle
    def __enter__(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.workdir.mkdir(exist_ok=True)
            lock = _Lock(self.workdir / "lock")
            try:
                lock.acquire()
            except FileNotFoundError:  # the previous writer removed the folder under us; try again
                continue
            if lock.still_ours():
                self._lock = lock
                break
            lock.release()
        else:  # pragma: no cover - needs a pathological race
            raise StoreLockedError(f"could not lock {self.workdir}; is another process removing it?")
        try:
            self._open_job()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def cached(self) -> bool:
        """True when a complete store with this key already exists (nothing to do)."""
        return self._cached

    def _open_job(self) -> None:
        self._cached = False
        if check_replaceable(self.path, self.key, self.spec, self.manifest_fingerprint, self.overwrite):
            self._cached = True
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        job = {
            "key": self.key,
            "spec": self.spec.to_dict(),
            "manifest_fingerprint": self.manifest_fingerprint,
            "rows": len(self.manifest),
            "dims": self.dims,
        }
        job_file = self.workdir / "job.json"
        if job_file.exists():
            try:
                old = json.loads(job_file.read_text())
            except json.JSONDecodeError:
                raise SpecMismatchError(
                    f"{job_file} is damaged; pass --overwrite to discard the interrupted job and start afresh"
                ) from None
            if old.get("key") != self.key:
                if not self.overwrite:
                    diffs = spec_differences(old.get("spec", {}), job["spec"])
                    if old.get("manifest_fingerprint") != self.manifest_fingerprint:
                        diffs.append("the images (manifest fingerprint)")
                    raise SpecMismatchError(
                        f"{self.workdir} holds an interrupted extraction with another spec "
                        f"(differs in: {'; '.join(diffs) or 'extractor version'}). Re-run that job to finish it, "
                        "pass --overwrite to discard it, or write to another --out"
                    )
                self._clear_parts()
        for part in sorted(self.workdir.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as data:
                    rows = data["rows"]
                    fail_rows, reasons = data["fail_rows"], data["fail_reasons"]
            except Exception as exc:  # a part damaged by power loss: recompute its rows
                log.warning("discarding unreadable part %s (%s); its rows will be extracted again", part.name, exc)
                part.unlink()
                continue
            self._done[rows] = True
            self._failed.update(zip(fail_rows.tolist(), reasons.tolist(), strict=True))
            self._next_part = max(self._next_part, int(part.stem.split("-")[1]) + 1)
        for stale in [*self.workdir.glob(".*.tmp*"), *self.workdir.glob("assembling-*.h5")]:
            stale.unlink()
        atomic_write(job_file, lambda fh: fh.write(canonical_json(job).encode()))
        if self._done.any() or self._failed:
            log.info(
                "resuming %s: %d rows already extracted, %d failed", self.path, self._done.sum(), len(self._failed)
            )

    def _clear_parts(self) -> None:
        for part in self.workdir.glob("part-*.npz"):
            part.unlink()

    # -- progress
    def pending_rows(self) -> np.ndarray:
        """Row indices still to extract (neither written nor recorded as failed), in order."""
        todo = ~self._done
        if self._failed:
            todo[list(self._failed)] = False
        return np.flatnonzero(todo)

    @property
    def n_done(self) -> int:
        return int(self._done.sum())

    @property
    def n_failed(self) -> int:
        return len(self._failed)

    @property
    def failed(self) -> dict[int, str]:
        """Failed rows and their reasons, so far."""
        return dict(self._failed)

    def write_batch(
        self,
        rows: np.ndarray,
        features: dict[str, np.ndarray],
        failures: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Persist one batch (atomically): features for ``rows``, and failed rows with their reasons."""
        rows = np.asarray(rows, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {
            "rows": rows,
            "fail_rows": np.array([r for r, _ in failures], dtype=np.int64),
            "fail_reasons": np.array([reason for _, reason in failures], dtype=np.str_),
        }
        storage = np.float16 if self.spec.dtype == "float16" else np.float32
        for i, layer in enumerate(self.spec.layers):
            block = np.asarray(features[layer], dtype=storage)
            if block.shape != (len(rows), self.dims[layer]):
                raise ValueError(f"layer {layer}: got {block.shape}, expected {(len(rows), self.dims[layer])}")
            arrays[f"f{i}"] = block
        target = self.workdir / f"part-{self._next_part:08d}.npz"
        atomic_write(target, lambda fh: np.savez(fh, **arrays))
        self._next_part += 1
        self._done[rows] = True
        self._failed.update((int(r), reason) for r, reason in failures)

    # -- assembly
    def finalize(self, stats: dict[str, Any] | None = None) -> Path:
        """Assemble the parts into the final HDF5 file (atomically) and remove the partial folder."""
        missing = self.pending_rows()
        if len(missing):
            raise IncompleteStoreError(f"cannot finalise {self.path}: {len(missing)} rows were never extracted")
        # Assembled inside the partial folder, so a kill during assembly leaves nothing beside the store.
        tmp = self.workdir / f"assembling-{os.getpid()}.h5"
        try:
            self._assemble(tmp, stats or {})
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.workdir, ignore_errors=True)  # the lock goes with it; we still hold its flock
        return self.path

    def _assemble(self, target: Path, stats: dict[str, Any]) -> None:
        m, n = self.manifest, len(self.manifest)
        with h5py.File(target, "w") as f:
            datasets = _create_layout(f, self.spec, self.dims, n)
            for part in sorted(self.workdir.glob("part-*.npz")):
                with np.load(part, allow_pickle=False) as data:
                    rows = data["rows"]
                    if not len(rows):
                        continue
                    order = np.argsort(rows, kind="stable")
                    sorted_rows = rows[order]
                    contiguous = sorted_rows[-1] - sorted_rows[0] + 1 == len(sorted_rows)
                    for i, layer in enumerate(self.spec.layers):
                        block = data[f"f{i}"][order]
                        if contiguous:
                            datasets[layer][sorted_rows[0] : sorted_rows[-1] + 1] = block
                        else:
                            datasets[layer][sorted_rows] = block
            sizes, mtimes = _file_stats(m.paths)
            fail_rows = np.array(sorted(self._failed), dtype=np.int64)
            _write_columns(
                f,
                ids=m.ids,
                paths=m.paths,
                labels=m.labels.astype(np.int64),
                file_size=sizes,
                file_mtime_ns=mtimes,
                split=np.array([SPLIT_CODES[s] for s in m.splits], dtype=np.int8),
                split_codes=SPLIT_CODES,
                class_names=m.class_names,
                done=self._done,
                fail_rows=fail_rows,
                fail_ids=[m.ids[r] for r in fail_rows],
                fail_reasons=[self._failed[r] for r in fail_rows],
            )
            _finish_attrs(
                f,
                {
                    "key": self.key,
                    "spec": canonical_json(self.spec.to_dict()),
                    "manifest_fingerprint": self.manifest_fingerprint,
                    "manifest_source": m.source,
                    "split_policy": m.split_policy,
                    "versions": canonical_json(library_versions()),
                    "stats": canonical_json(stats),
                    **self.attrs,
                },
            )


# ------------------------------------------------------------------------------------ file layout
# The two writers of finished stores (StoreWriter's assembly and `concatenate`) share these three
# helpers, so a joined store cannot drift from the layout of one written in a single process.
def _create_layout(f: h5py.File, spec: ExtractionSpec, dims: dict[str, int], n: int) -> dict[str, h5py.Dataset]:
    """Stamp the format (marked incomplete) and create the zero-filled ``/features/<layer>`` datasets."""
    storage = np.float16 if spec.dtype == "float16" else np.float32
    f.attrs["featx_format"] = FORMAT_NAME
    f.attrs["featx_format_version"] = FORMAT_VERSION
    f.attrs["complete"] = False
    group = f.create_group("features")
    datasets = {}
    for layer in spec.layers:
        d = dims[layer]
        rows_per_chunk = int(max(1, min(n, _CHUNK_BYTES // (d * np.dtype(storage).itemsize))))
        datasets[layer] = group.create_dataset(
            layer, shape=(n, d), dtype=storage, chunks=(rows_per_chunk, d), fillvalue=0
        )
    return datasets


def _write_columns(
    f: h5py.File,
    *,
    ids: Sequence[str],
    paths: Sequence[str],
    labels: np.ndarray,
    file_size: np.ndarray,
    file_mtime_ns: np.ndarray,
    split: np.ndarray,
    split_codes: dict[str, int],
    class_names: Sequence[str],
    done: np.ndarray,
    fail_rows: np.ndarray,
    fail_ids: Sequence[str],
    fail_reasons: Sequence[str],
) -> None:
    """Write every per-row dataset except the features, and the failures group."""
    strings = h5py.string_dtype(encoding="utf-8")
    f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=strings)
    f.create_dataset("paths", data=np.array(list(paths), dtype=object), dtype=strings)
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    f.create_dataset("file_size", data=np.asarray(file_size, dtype=np.int64))
    f.create_dataset("file_mtime_ns", data=np.asarray(file_mtime_ns, dtype=np.int64))
    ds = f.create_dataset("split", data=np.asarray(split, dtype=np.int8))
    ds.attrs["codes"] = canonical_json(split_codes)
    f.create_dataset("class_names", data=np.array(list(class_names), dtype=object), dtype=strings)
    f.create_dataset("done", data=np.asarray(done, dtype=bool))
    fg = f.create_group("failures")
    fg.create_dataset("rows", data=np.asarray(fail_rows, dtype=np.int64))
    fg.create_dataset("ids", data=np.array(list(fail_ids), dtype=object), dtype=strings)
    fg.create_dataset("reasons", data=np.array(list(fail_reasons), dtype=object), dtype=strings)


def _finish_attrs(f: h5py.File, attrs: dict[str, str]) -> None:
    """Write the provenance attributes and, last of all, mark the file complete."""
    for name, value in attrs.items():
        f.attrs[name] = value
    f.attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    f.attrs["complete"] = True


def _file_stats(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Size and modification time of each file as extracted (-1 when missing), for per-image reuse checks."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _mismatch_message(path: Path, spec: ExtractionSpec, fingerprint: str) -> str:
    try:
        with FeatureStore(path) as old:
            diffs = spec_differences(old.spec.to_dict(), spec.to_dict())
            if old.attrs["manifest_fingerprint"] != fingerprint:
                diffs.append("the images or their labels/splits (manifest fingerprint)")
        what = "; ".join(diffs) or "the extractor version"
        return (
            f"{path} already holds features made differently (differs in: {what}). featx never reuses a store "
            "made with another spec: pass --overwrite to replace it, or write to another --out"
        )
    except Exception:
        return (
            f"{path} exists and is not a complete featx store; pass --overwrite to replace it, or choose another --out"
        )


def partial_progress(path: str | Path) -> tuple[int, int, int] | None:
    """For an unfinished store: ``(rows done, rows failed, total rows)``; ``None`` if there is no partial job."""
    work = partial_path(path)
    job = work / "job.json"
    if not job.is_file():
        return None
    total = json.loads(job.read_text()).get("rows", 0)
    done = failed = 0
    for part in work.glob("part-*.npz"):
        with contextlib.suppress(Exception), np.load(part, allow_pickle=False) as data:
            done += len(data["rows"])
            failed += len(data["fail_rows"])
    return done, failed, total


# ------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Failure:
    """An image that could not be extracted."""

    row: int
    id: str
    reason: str


class FeatureStore:
    """A complete feature store opened for reading (see :func:`open`).

    Row selections (``split``) default to all rows that hold features; failed rows are left out
    everywhere unless ``include_failed=True`` (their features are zeros).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            progress = partial_progress(self.path)
            if progress is not None:
                done, failed, total = progress
                raise IncompleteStoreError(
                    f"{self.path} is not finished: {done + failed} of {total} images processed so far. The "
                    "extraction was interrupted or is still running; re-run the same `featx extract` command "
                    "to resume it"
                )
            if shards_path(self.path).is_dir():
                raise IncompleteStoreError(
                    f"{self.path} is being extracted in shards that are not joined yet (see "
                    f"{shards_path(self.path)}); when every shard is done, `featx join {self.path}` joins them"
                )
            raise FileNotFoundError(f"feature store {str(self.path)!r} does not exist")
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
        self.spec = ExtractionSpec.from_dict(json.loads(self.attrs["spec"]))
        self.key: str = self.attrs["key"]
        self.layers: tuple[str, ...] = self.spec.layers
        self.class_names: list[str] = [s.decode() if isinstance(s, bytes) else s for s in self._file["class_names"][:]]
        self._labels = self._file["labels"][:]
        self._split = self._file["split"][:]
        # Codes as written in the file, so a future reordering of SPLITS cannot misread old stores.
        codes = json.loads(self._file["split"].attrs.get("codes", canonical_json(SPLIT_CODES)))
        self._codes: dict[str, int] = dict(sorted(codes.items(), key=lambda item: item[1]))
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
            s: int(((self._split == c) & self._done).sum()) for s, c in self._codes.items() if (self._split == c).any()
        }

    def rows(self, split: str | None = None, include_failed: bool = False) -> np.ndarray:
        """Row indices of a split (all splits when ``None``)."""
        mask = np.ones(len(self), dtype=bool) if include_failed else self._done.copy()
        if split is not None:
            if split not in self._codes:
                raise unknown("split", split, self._codes, f"Splits are {', '.join(self._codes)}.")
            mask &= self._split == self._codes[split]
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
        out = _read_rows(ds, rows)
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
        return _read_rows(self._file["features"][self._layer(layer)], rows), self._labels[rows]

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
            yield _read_rows(ds, block), self._labels[block], block

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
                "split_policy": self.attrs.get("split_policy"),
            },
            "failures": len(self.failures),
            "stats": json.loads(self.attrs.get("stats", "{}")),
            "versions": json.loads(self.attrs.get("versions", "{}")),
        }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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
        same = ("spec", "manifest_fingerprint", "manifest_source", "split_policy")
        for store in stores[1:]:
            diffs = [name for name in same if store.attrs.get(name) != first.attrs.get(name)]
            if store.class_names != first.class_names:
                diffs.append("class_names")
            if store._codes != first._codes:
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
        tmp = target.with_name(f".{target.name}.joining-{os.getpid()}")
        try:
            _join_into(tmp, stores, key, stats or {}, {"versions": versions[0], **(attrs or {})})
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        for store in stores:
            store.close()
    return target


def _join_into(
    target: Path, stores: Sequence[FeatureStore], key: str, stats: dict[str, Any], attrs: dict[str, str]
) -> None:
    first = stores[0]
    n = sum(len(store) for store in stores)
    offsets = np.cumsum([0] + [len(store) for store in stores])

    def column(name: str) -> np.ndarray:
        return np.concatenate([store._file[name][:] for store in stores])

    def failures(name: str) -> np.ndarray:
        return np.concatenate([store._file["failures"][name][:] for store in stores])

    with h5py.File(target, "w") as f:
        datasets = _create_layout(f, first.spec, first.feature_dims(), n)
        for layer, out in datasets.items():
            step = max(1, _COPY_BYTES // (out.shape[1] * out.dtype.itemsize))
            for store, offset in zip(stores, offsets, strict=False):
                src = store._file["features"][layer]
                for start in range(0, len(store), step):
                    stop = min(len(store), start + step)
                    out[offset + start : offset + stop] = src[start:stop]
        _write_columns(
            f,
            ids=[_text(s) for s in column("ids")],
            paths=[_text(s) for s in column("paths")],
            labels=column("labels"),
            file_size=column("file_size"),
            file_mtime_ns=column("file_mtime_ns"),
            split=column("split"),
            split_codes=first._codes,
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
                **{
                    name: first.attrs[name]
                    for name in ("spec", "manifest_fingerprint", "manifest_source", "split_policy")
                },
                "stats": canonical_json(stats),
                **attrs,
            },
        )


def open(path: str | Path) -> FeatureStore:
    """Open a complete feature store for reading.

    Raises
    ------
    IncompleteStoreError
        The store's extraction was interrupted (or is still running); the message says how to resume.
    FileNotFoundError
        No store and no partial job at ``path``.

    Examples
    --------
    >>> import featx.store
    >>> with featx.store.open("digits.h5") as store:  # doctest: +SKIP
    ...     X, y = store.features(split="train"), store.labels(split="train")
    """
    return FeatureStore(path)
