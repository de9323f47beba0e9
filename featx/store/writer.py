"""Writing a store crash-safely and resumably, one writer at a time.

:class:`StoreWriter` persists each batch as an atomic ``.npz`` part in ``STORE.h5.partial/`` (so a killed job
resumes from its last batch), holds a lock there that dies with the writing process, and at the end assembles
the parts into the HDF5 file, renamed into place only when complete. :func:`check_replaceable` decides whether
a store already at the path is this job's (a cache hit), or another's (refused unless ``overwrite``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx._runtime.env import library_versions
from featx._runtime.io import atomic_path, atomic_write
from featx._runtime.lock import FileLock, LockHeld, processes_with_open
from featx.data.manifest import Manifest, stat_fingerprint
from featx.exceptions import DiskFullError, IncompleteStoreError, SpecMismatchError, StoreLockedError
from featx.spec import ExtractionSpec, canonical_json, spec_differences
from featx.store.format import (
    SPLIT_CODES,
    _column_bytes,
    _create_layout,
    _disk_full,
    _file_stats,
    _finish_attrs,
    _text,
    _write_columns,
    _write_hdf5_guarded,
    partial_path,
    read_key,
)
from featx.store.reader import FeatureStore

__all__ = ["StoreWriter", "adopt_legacy_store", "check_not_locked", "check_replaceable", "update_labels"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- locking
def _take_lock(path: Path) -> FileLock:
    """Lock ``path`` (see :class:`FileLock`: the lock dies with this process, its forked workers never hold it).

    Raises
    ------
    StoreLockedError
        Another live process, or another writer in this one, holds it; the message names the holder's pid.
    """
    lock = FileLock(path)
    try:
        lock.acquire()
    except LockHeld as exc:
        holder = exc.holder  # "pid N on HOST", as the holder wrote it
        if holder.startswith("this process"):
            holder = f"pid {os.getpid()}: this very process, through another StoreWriter"
        raise StoreLockedError(
            f"another featx process ({holder}) is writing {path.parent.name.removesuffix('.partial')}; "
            "wait for it to finish (re-running afterwards is a cache hit) or write to another --out"
        ) from None
    return lock


def check_not_locked(path: str | Path) -> None:
    """Refuse at once when another writer holds the store at ``path``: a check before a model loads for seconds.

    Takes nothing and creates nothing (a store with no work folder has no writer). The writer takes the lock
    itself later; this only moves the refusal of a second writer before the slow part.

    Raises
    ------
    StoreLockedError
        As :class:`StoreWriter` would, naming the holder's pid.
    """
    lock_file = partial_path(Path(path)) / "lock"
    if not lock_file.is_file():
        return
    with contextlib.suppress(FileNotFoundError):  # its writer finished and removed the folder meanwhile
        _take_lock(lock_file).release()


def _open_for_update(path: Path) -> h5py.File:
    """Open a complete store to rewrite some of its attributes or columns in place.

    HDF5 locks a file while any process has it open, so a store open elsewhere (a ``featx train``, a notebook)
    cannot be updated: say so, naming the store and, where the system tells, the processes holding it.

    Raises
    ------
    StoreLockedError
        Another process has the store open.
    """
    try:
        return h5py.File(path, "r+")
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise
        holders = processes_with_open(path)
        by = f" by {', '.join(holders)}" if holders else " by another process"
        raise StoreLockedError(
            f"{path} is open{by}, so featx cannot update it in place (its labels or its key); close it there "
            "(or wait for that command to finish) and run again"
        ) from None


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
        self._lock: FileLock | None = None
        self._next_part = 0
        self._done = np.zeros(len(manifest), dtype=bool)
        self._failed: dict[int, str] = {}
        self._resumed_seconds = 0.0
        self._resumed_run: dict[str, Any] = {}

    # -- lifecycle
    def __enter__(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.workdir.mkdir(exist_ok=True)
            try:
                lock = _take_lock(self.workdir / "lock")
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
                    seconds = float(data["seconds"]) if "seconds" in data else 0.0  # an earlier featx saved none
                    run = json.loads(str(data["run"])) if "run" in data else {}
            except Exception as exc:  # a part damaged by power loss: recompute its rows
                log.warning("discarding unreadable part %s (%s); its rows will be extracted again", part.name, exc)
                part.unlink()
                continue
            self._resumed_seconds += seconds
            self._resumed_run = run or self._resumed_run  # parts are read in order: the last run's settings win
            self._done[rows] = True
            self._failed.update(zip(fail_rows.tolist(), reasons.tolist(), strict=True))
            self._next_part = max(self._next_part, int(part.stem.split("-")[1]) + 1)
        for stale in [*self.workdir.glob(".*.tmp*"), *self.workdir.glob("assembling-*.h5*")]:  # .h5.reserve too
            stale.unlink()
        try:
            atomic_write(job_file, lambda fh: fh.write(canonical_json(job).encode()))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full("starting the job") from None
            raise
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

    @property
    def resumed_seconds(self) -> float:
        """Seconds the earlier, interrupted runs of this job spent on the batches they saved."""
        return self._resumed_seconds

    @property
    def resumed_run(self) -> dict[str, Any]:
        """How the last earlier run of this job ran the network (the ``run`` of its last saved batch), or ``{}``."""
        return dict(self._resumed_run)

    def write_batch(
        self,
        rows: np.ndarray,
        features: dict[str, np.ndarray],
        failures: Sequence[tuple[int, str]] = (),
        *,
        seconds: float = 0.0,
        run: dict[str, Any] | None = None,
    ) -> None:
        """Persist one batch (atomically): features for ``rows``, and failed rows with their reasons.

        A row whose features are not finite (NaN or infinite, in any layer, as stored) is recorded as a failure
        with the reason instead: no classifier can learn from it. ``seconds`` (what the batch cost) and ``run``
        (how the network ran) are kept with the batch, so a resumed job's stats add up every run's work.

        Raises
        ------
        DiskFullError
            The disk is full; the batches saved before are kept.
        """
        rows = np.asarray(rows, dtype=np.int64)
        storage = np.float16 if self.spec.dtype == "float16" else np.float32
        blocks, bad = [], np.zeros(len(rows), dtype=bool)
        failures = list(failures)
        for layer in self.spec.layers:
            raw = np.asarray(features[layer])
            with np.errstate(over="ignore"):  # float16 overflow becomes infinity: a failure with its reason below
                block = raw.astype(storage, copy=False)
            if block.shape != (len(rows), self.dims[layer]):
                raise ValueError(f"layer {layer}: got {block.shape}, expected {(len(rows), self.dims[layer])}")
            not_finite = ~np.isfinite(block).all(axis=1) & ~bad
            for k in np.flatnonzero(not_finite):
                failures.append((int(rows[k]), _non_finite_reason(layer, raw[k])))
            bad |= not_finite
            blocks.append(block)
        keep = ~bad
        arrays: dict[str, np.ndarray] = {
            "rows": rows[keep],
            "fail_rows": np.array([r for r, _ in failures], dtype=np.int64),
            "fail_reasons": np.array([reason for _, reason in failures], dtype=np.str_),
            "seconds": np.float64(seconds),
            "run": np.str_(canonical_json(run or {})),
        }
        for i, block in enumerate(blocks):
            arrays[f"f{i}"] = block[keep] if bad.any() else block
        target = self.workdir / f"part-{self._next_part:08d}.npz"
        try:
            atomic_write(target, lambda fh: np.savez(fh, **arrays))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full("saving a batch") from None
            raise
        self._next_part += 1
        self._done[rows[keep]] = True
        self._failed.update((int(r), reason) for r, reason in failures)

    # -- assembly
    def finalize(self, stats: dict[str, Any] | None = None) -> Path:
        """Assemble the parts into the final HDF5 file (atomically) and remove the partial folder."""
        missing = self.pending_rows()
        if len(missing):
            raise IncompleteStoreError(f"cannot finalise {self.path}: {len(missing)} rows were never extracted")
        features, columns = self._estimated_bytes()
        # Assembled inside the partial folder, so a kill during assembly leaves nothing beside the store.
        with atomic_path(self.path, self.workdir / f"assembling-{os.getpid()}.h5") as tmp:
            _write_hdf5_guarded(
                tmp,
                features,
                columns,
                lambda f, columns_next: self._write_store(f, stats or {}, columns_next),
                f"assembling {self.path}",
                f"run the same command again: the {self.n_done + self.n_failed} rows already saved are kept and resume",
            )
        shutil.rmtree(self.workdir, ignore_errors=True)  # unlinks the lock file, held until _release
        return self.path

    def _estimated_bytes(self) -> tuple[int, int]:
        """``(features, the rest)``: about how many bytes the finished store takes, the features exactly."""
        itemsize = 2 if self.spec.dtype == "float16" else 4
        features = len(self.manifest) * sum(self.dims.values()) * itemsize
        return features, _column_bytes(self.manifest.ids, self.manifest.paths, list(self._failed.values()))

    def _disk_full(self, doing: str) -> DiskFullError:
        return _disk_full(
            self.workdir,
            f"{doing} of {self.path}",
            None,
            None,
            f"run the same command again: the {self.n_done + self.n_failed} rows already saved are kept and resume",
        )

    def _write_store(self, f: h5py.File, stats: dict[str, Any], columns_next: Callable[[], None]) -> None:
        m, n = self.manifest, len(self.manifest)
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
        columns_next()  # the space set aside is now the columns' and the metadata's
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
                "labels_fingerprint": m.labels_fingerprint(),
                "manifest_source": m.source,
                "split_policy": m.split_policy,
                "versions": canonical_json(library_versions()),
                "stats": canonical_json(stats),
                **self.attrs,
            },
        )


def _non_finite_reason(layer: str, values: np.ndarray) -> str:
    """Why a row of features is not finite: the network gave NaN or infinity, or float16 storage overflowed."""
    if np.isfinite(values).all():
        return (
            f"features of layer {layer} overflow float16 (largest magnitude {np.abs(values).max():.3g}, over "
            "65504); extract with --dtype float32"
        )
    return (
        f"the network gave non-finite features (NaN or infinity) in layer {layer}; check the weights (a checkpoint "
        "holding NaN or infinite values?) and the backbone's preprocessing"
    )


def _mismatch_message(path: Path, spec: ExtractionSpec, fingerprint: str) -> str:
    try:
        with FeatureStore(path) as old:
            diffs = spec_differences(old.spec.to_dict(), spec.to_dict())
            if old.attrs["manifest_fingerprint"] != fingerprint:
                diffs.append("the images (their ids, paths, sizes or modification times)")
        what = "; ".join(diffs) or "the extractor version"
        return (
            f"{path} already holds features made differently (differs in: {what}). featx never reuses a store "
            "made with another spec: pass --overwrite to replace it, or write to another --out"
        )
    except Exception:
        return (
            f"{path} exists and is not a complete featx store; pass --overwrite to replace it, or choose another --out"
        )


# ------------------------------------------------------------------------------------- labels layer
def _unshare(path: Path) -> None:
    """Give ``path`` a file of its own when it is hard-linked (:func:`featx.store.index.link_store`), so the
    in-place label rewrite that follows never changes the store at the other path."""
    if path.stat().st_nlink > 1:
        with atomic_path(path) as tmp:
            shutil.copyfile(path, tmp)


def update_labels(path: str | Path, manifest: Manifest) -> bool:
    """Give a complete store the labels, source splits and class names of ``manifest`` (same images, same order).

    The features depend on the images only, so a relabelled CSV (or a source whose class names changed)
    rewrites these small columns in place instead of extracting again. The store's ``labels_fingerprint`` is
    blanked first and set last, so an update cut short is detected on opening and redone by the next run.

    Returns
    -------
    bool
        Whether anything changed.

    Raises
    ------
    SpecMismatchError
        The store's ids differ from the manifest's (it holds other images).
    """
    path = Path(path)
    wanted = manifest.labels_fingerprint()
    with h5py.File(path, "r") as f:
        if f.attrs.get("labels_fingerprint") == wanted:
            return False
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["ids"][:]]
    if ids != list(manifest.ids):
        raise SpecMismatchError(f"{path} holds other images than {manifest.source}: its ids differ")
    workdir = partial_path(path)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(workdir / "lock")
    try:
        _unshare(path)
        with _open_for_update(path) as f:
            f.attrs["labels_fingerprint"] = ""
            f.flush()
            for name in ("labels", "split", "class_names"):
                if name in f:  # an update cut short may have removed some already
                    del f[name]
            strings = h5py.string_dtype(encoding="utf-8")
            f.create_dataset("labels", data=manifest.labels.astype(np.int64))
            split = f.create_dataset("split", data=np.array([SPLIT_CODES[s] for s in manifest.splits], dtype=np.int8))
            split.attrs["codes"] = canonical_json(SPLIT_CODES)
            f.create_dataset("class_names", data=np.array(list(manifest.class_names), dtype=object), dtype=strings)
            f.attrs["split_policy"] = manifest.split_policy
            f.attrs["manifest_source"] = manifest.source
            f.flush()
            f.attrs["labels_fingerprint"] = wanted
    finally:
        lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("%s: labels and splits updated from %s (features kept)", path, manifest.source)
    return True


def adopt_legacy_store(path: str | Path, key: str, spec: ExtractionSpec, images_fingerprint: str) -> bool:
    """Re-key a store written before format 2 (its key also hashed labels and splits) when it holds these images.

    Only ``stat`` fingerprints can be checked from the store's own columns (ids, paths, sizes and modification
    times); a ``content``-fingerprinted old store is not adopted (its extraction must run again).

    Returns
    -------
    bool
        Whether the store was adopted under ``key``.
    """
    path = Path(path)
    if not images_fingerprint.startswith("images-stat:"):
        return False
    try:
        with FeatureStore(path) as old:
            if int(old.attrs.get("featx_format_version", 0)) >= 2 or old.spec.to_dict() != spec.to_dict():
                return False
            if not str(old.attrs.get("manifest_fingerprint", "")).startswith("stat:"):
                return False
            columns = old._file
            ids, paths = [_text(s) for s in columns["ids"][:]], [_text(s) for s in columns["paths"][:]]
            recorded = stat_fingerprint(ids, paths, columns["file_size"][:], columns["file_mtime_ns"][:])
    except Exception:
        return False
    if recorded != images_fingerprint:
        return False
    workdir = partial_path(path)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(workdir / "lock")  # one writer at a time, as for an extraction
    try:
        with _open_for_update(path) as f:
            f.attrs["manifest_fingerprint"] = images_fingerprint
            f.attrs["featx_format_version"] = 2
            f.attrs["key"] = key
    finally:
        lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("%s: a store of an earlier featx, same spec and images: re-keyed, no extraction needed", path)
    return True
