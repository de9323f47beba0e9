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
                manifest_fingerprint (the images), labels_fingerprint, manifest_source, split_policy,
                versions, created_at, stats

Crash safety: while a job runs, each finished batch is written as one small ``.npz`` part into
``STORE.h5.partial/`` (temporary file, fsync, atomic rename). The HDF5 file is assembled from the parts
only at the end, written under a temporary name and renamed into place, so a store that exists is
complete; a job killed at any moment leaves parts that the next run with the same key resumes from.
One writer at a time: the ``.partial`` folder holds a lock that dies with its writer
(:class:`featx._runtime.lock.FileLock`).

A store extracted in shards (:mod:`featx.extract.sharded`) keeps them in ``STORE.h5.shards/`` until they are
joined with :func:`concatenate` into an ordinary store like the one above.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx._runtime.env import timestamp
from featx.data.manifest import SPLITS
from featx.exceptions import DiskFullError, StoreError
from featx.spec import ExtractionSpec, canonical_json

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SPLIT_CODES",
    "Failure",
    "check_consistency",
    "partial_path",
    "partial_progress",
    "read_format_version",
    "read_key",
    "read_labels_fingerprint",
    "shards_path",
]


FORMAT_NAME = "featx.feature-store"


#: 2: the images fingerprint alone keys a store (labels and splits are a layer, `labels_fingerprint`), and
#: the split column holds the source's splits, carved on reading by a split plan.
FORMAT_VERSION = 2


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


# ------------------------------------------------------------------------------------------- writing
def _complete_attr(path: str | Path, name: str) -> str | None:
    """Attribute ``name`` of a complete featx store, or ``None`` (no complete store, or no such attribute)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("featx_format") != FORMAT_NAME or not f.attrs.get("complete", False):
                return None
            value = f.attrs.get(name)
            return None if value is None else str(value)
    except OSError:
        return None


def read_key(path: str | Path) -> str | None:
    """The cache key of a complete store, or ``None`` if ``path`` is no complete featx store."""
    return _complete_attr(path, "key")


def read_format_version(path: str | Path) -> int | None:
    """The format version of a complete featx store, or ``None`` (no complete store)."""
    if _complete_attr(path, "featx_format") is None:
        return None
    return int(_complete_attr(path, "featx_format_version") or 0)


def read_labels_fingerprint(path: str | Path) -> str | None:
    """The hash of a complete store's labels layer (ids, labels, source splits, class names), or ``None`` (no
    complete store, or one written before featx recorded it)."""
    return _complete_attr(path, "labels_fingerprint")


# ------------------------------------------------------------------------------------ file layout
# The two writers of finished stores (StoreWriter's assembly and `concatenate`) share these three
# helpers, so a joined store cannot drift from the layout of one written in a single process.
def create_layout(f: h5py.File, spec: ExtractionSpec, dims: dict[str, int], n: int) -> dict[str, h5py.Dataset]:
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


def write_columns(
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


def finish_attrs(f: h5py.File, attrs: dict[str, str]) -> None:
    """Write the provenance attributes and, last of all, mark the file complete."""
    for name, value in attrs.items():
        f.attrs[name] = value
    f.attrs["created_at"] = timestamp()
    f.attrs["complete"] = True


# HDF5 writes its metadata (and small datasets) when the file is closed; a disk that fills then crashes h5py
# (a segfault, not an exception). So the columns and that final flush get space set aside before the features
# are written: this much beyond the columns' estimated size.
_METADATA_RESERVE = 8 << 20


def column_bytes(ids: Sequence[str], paths: Sequence[str], reasons: Sequence[str]) -> int:
    """About how many bytes a store's columns take: each string a heap object and a reference, 26 bytes of
    numbers per row."""
    text = sum(len(s.encode()) for s in ids) + sum(len(s.encode()) for s in paths)
    return text + len(ids) * (2 * 48 + 26) + sum(len(r.encode()) + 64 for r in reasons)


def disk_full_error(folder: Path, doing: str, needed: int | None, free: int | None, then: str) -> DiskFullError:
    """The error for a full disk: the folder, what was being written, the space needed and free, what is kept."""
    free = shutil.disk_usage(folder).free if free is None else free
    need = f"it needs about {needed / 2**20:,.1f} MiB there and " if needed else ""
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the disk of {folder} for {doing}: {need}the disk has {free / 2**20:,.1f} MiB free. "
        f"Free some space and {then}",
    )


def write_hdf5_guarded(
    target: Path,
    features_bytes: int,
    columns_bytes: int,
    write: Callable[[h5py.File, Callable[[], None]], None],
    doing: str,
    then: str,
) -> None:
    """Write the HDF5 file ``target`` with ``write(file, columns_next)`` so that a full disk is a
    :class:`~featx.exceptions.DiskFullError`, never an h5py crash.

    The free space is checked first; space for the columns and the final metadata flush is set aside in a file
    beside ``target`` until ``write`` calls ``columns_next()`` (after the features); the file has no chunk cache,
    so a full disk fails a write call; after any error the half-written file is emptied before h5py closes it.

    Raises
    ------
    DiskFullError
        Naming the folder, ``doing`` (what was written), the space needed and free, and ``then`` (what to do).
    """
    folder = target.parent
    needed = features_bytes + columns_bytes + _METADATA_RESERVE
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise disk_full_error(folder, doing, needed, free, then)
    reserve = target.with_name(f"{target.name}.reserve")
    try:
        _set_aside(reserve, columns_bytes + _METADATA_RESERVE)
        f = h5py.File(target, "w", rdcc_nbytes=0)  # no chunk cache: a full disk fails the write, not the close
        try:
            write(f, lambda: reserve.unlink(missing_ok=True))
        except BaseException:
            # Closing flushes metadata; into a full disk h5py would crash. Emptying the file first frees its space.
            with contextlib.suppress(OSError):
                os.truncate(target, 0)
            with contextlib.suppress(Exception):
                f.close()
            raise
        f.close()
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise disk_full_error(folder, doing, needed, None, then) from None
    finally:
        reserve.unlink(missing_ok=True)


def _set_aside(path: Path, size: int) -> None:
    """Claim ``size`` bytes of disk in a file at ``path`` (allocated, not sparse), for writes that must not fail.

    Raises
    ------
    OSError
        ``ENOSPC`` when the disk has less.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except (AttributeError, OSError) as exc:  # macOS has none; some filesystems refuse it
            if getattr(exc, "errno", None) == errno.ENOSPC:
                raise
        block = b"\0" * (1 << 20)
        for start in range(0, size, len(block)):
            os.write(fd, block[: size - start])
    finally:
        os.close(fd)


def file_stats(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
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


def as_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


#: The per-row datasets of a store (besides ``/features/<layer>``), each ``[N]``.
_ROW_COLUMNS = ("ids", "paths", "labels", "file_size", "file_mtime_ns", "split", "done")


def _json_attr(path: Path, owner: h5py.AttributeManager, name: str, default: str | None = None) -> Any:
    raw = owner.get(name, default)
    if raw is None:
        raise _damaged(path, f"its {name!r} attribute is missing")
    try:
        return json.loads(as_text(raw))
    except (TypeError, ValueError) as exc:
        raise _damaged(path, f"its {name!r} attribute is not valid JSON ({exc})") from None


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(
        f"{path} is damaged or was changed outside featx: {what}. Delete it and run the extraction that made it "
        "again (`featx extract … --overwrite` replaces it)"
    )


def check_consistency(f: h5py.File, path: str | Path) -> ExtractionSpec:
    """Check that a complete store agrees with itself, before anything reads a row of it; return its spec.

    A store is only ever written whole (see the module's docstring), so a fault here means it was edited or
    damaged after the fact: a missing dataset or attribute, columns of different lengths, a split code or a
    label that names nothing, a spec that does not parse.

    Raises
    ------
    StoreError
        The first fault found, naming ``path`` and what is wrong.
    """
    path = Path(path)
    spec_data = _json_attr(path, f.attrs, "spec")
    try:
        spec = ExtractionSpec.from_dict(spec_data)
    except ValueError as exc:  # written by a newer featx: its own message says so
        raise StoreError(f"{path}: {exc}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        reason = f"its 'spec' attribute does not describe an extraction ({type(exc).__name__}: {exc})"
        raise _damaged(path, reason) from None
    if not isinstance(f.attrs.get("key"), (str, bytes)):
        raise _damaged(path, "its cache 'key' attribute is missing")
    for name in ("stats", "versions"):
        if name in f.attrs:
            _json_attr(path, f.attrs, name)
    missing = [
        n for n in (*_ROW_COLUMNS, "class_names", "failures/rows", "failures/ids", "failures/reasons") if n not in f
    ]
    if missing:
        raise _damaged(path, f"it lacks the dataset{'s' * (len(missing) > 1)} {', '.join(missing)}")
    features = f.get("features")
    held = sorted(features) if isinstance(features, h5py.Group) else []
    for layer in spec.layers:
        if layer not in held:
            raise _damaged(
                path,
                f"it holds no features for layer {layer!r} of its spec (features held: {', '.join(held) or 'none'})",
            )
    n = len(f["ids"])
    lengths = {name: f[name].shape[0] if f[name].ndim else 0 for name in _ROW_COLUMNS}
    lengths |= {f"features/{layer}": f["features"][layer].shape[0] for layer in spec.layers}
    wrong = {name: length for name, length in lengths.items() if length != n}
    if wrong:
        words = ", ".join(f"{name} {length}" for name, length in wrong.items())
        raise _damaged(path, f"it has {n} ids but {words} rows")
    for layer in spec.layers:
        if f["features"][layer].ndim != 2:
            raise _damaged(path, f"features/{layer} has shape {f['features'][layer].shape}, not [rows, dims]")
    codes = _json_attr(path, f["split"].attrs, "codes", canonical_json(SPLIT_CODES))
    if not isinstance(codes, dict) or set(codes) - set(SPLIT_CODES):
        raise _damaged(path, f"its split codes {codes!r} name splits other than {', '.join(SPLIT_CODES)}")
    unknown_codes = sorted(set(np.unique(f["split"][:]).tolist()) - set(codes.values()))
    if unknown_codes:
        raise _damaged(path, f"its split column holds code {unknown_codes[0]}, which names no split (codes: {codes})")
    n_classes = len(f["class_names"])
    labels = f["labels"][:]
    bad = np.flatnonzero((labels < -1) | (labels >= n_classes))
    if len(bad):
        raise _damaged(
            path,
            f"row {int(bad[0])} has label {int(labels[bad[0]])}, but there are {n_classes} class names "
            f"(labels run from 0 to {n_classes - 1}, -1 for none)",
        )
    fail_rows = f["failures/rows"][:]
    if not len(fail_rows) == len(f["failures/ids"]) == len(f["failures/reasons"]):
        raise _damaged(path, "its failures/rows, failures/ids and failures/reasons differ in length")
    if len(fail_rows) and (fail_rows.min() < 0 or fail_rows.max() >= n):
        raise _damaged(path, f"its failures name rows outside 0..{n - 1}")
    return spec
