"""Sharded extraction: one manifest split by rank, one store per shard, and the join into one store.

Under ``torchrun`` every rank builds the same manifest and cache key, checks with the others that they
agree, extracts its own contiguous block of rows into a normal crash-safe, resumable store, and after
a barrier rank 0 joins the shards into the store a single process would have written. Without
``torchrun`` one shard can be (re-)run alone (``--shard INDEX/COUNT``) and the shards joined later
(``featx join STORE``). ``torch.distributed`` only carries barriers and the key check: the extraction
engine itself is unchanged.

Layout next to the final ``STORE.h5`` while shards exist::

    STORE.h5.shards/shard-00003-of-00008.h5           a finished shard (a normal featx store)
    STORE.h5.shards/shard-00003-of-00008.h5.partial/  an unfinished one (resumed by re-running it)

Shard ``i`` of ``n`` holds rows ``[i * N // n, (i + 1) * N // n)`` of the manifest: contiguous blocks, so
the join is a concatenation, and shard sizes differ by at most one row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx._runtime.dist import BARRIER_TIMEOUT, TorchrunEnv, World, gather_objects, process_group
from featx.data.manifest import Manifest
from featx.exceptions import IncompleteStoreError, SpecMismatchError
from featx.extract.engine import ExtractionResult, _cached_result, _extract_store, _Job, _result
from featx.spec import ExtractionSpec, canonical_json
from featx.store.format import Failure, partial_progress, read_key, shards_path
from featx.store.join import concatenate
from featx.store.reader import FeatureStore
from featx.store.writer import check_replaceable

__all__ = [
    "JoinResult",
    "Shard",
    "check_agreement",
    "join_shards",
    "rerun_hint",
    "shard_attrs",
    "shard_manifest",
    "shard_path",
]

log = logging.getLogger(__name__)


_SHARD_FILE = re.compile(r"shard-(\d{5})-of-(\d{5})\.h5(\.partial)?")


# -------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` (from 0, the torchrun ``RANK``) of ``count``: a contiguous block of manifest rows."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: write INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/8 "
                "for the fourth of eight shards (INDEX is the torchrun RANK)"
            )

    @classmethod
    def parse(cls, text: str | Shard) -> Shard:
        """``"3/8"`` → ``Shard(3, 8)``."""
        if isinstance(text, Shard):
            return text
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"shard {text!r}: write INDEX/COUNT, e.g. 3/8 (INDEX from 0 to COUNT-1)")
        return cls(int(m.group(1)), int(m.group(2)))

    def rows(self, n_rows: int) -> tuple[int, int]:
        """``(start, stop)`` of this shard's block of a manifest with ``n_rows`` rows."""
        return self.index * n_rows // self.count, (self.index + 1) * n_rows // self.count

    def key(self, job_key: str) -> str:
        """The shard store's own cache key: derived from the whole job's key and the shard's place."""
        payload = canonical_json({"job": job_key, "shard": [self.index, self.count]})
        return hashlib.sha256(payload.encode()).hexdigest()

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_path(path: str | Path, shard: Shard) -> Path:
    """Where shard ``shard`` of the store ``path`` is written: ``STORE.h5.shards/shard-IIIII-of-NNNNN.h5``."""
    return shards_path(path) / f"shard-{shard.index:05d}-of-{shard.count:05d}.h5"


def shard_manifest(manifest: Manifest, shard: Shard) -> Manifest:
    """The rows of ``manifest`` that ``shard`` extracts (same class names, source and split policy).

    Raises
    ------
    ValueError
        The manifest has fewer rows than there are shards, so some shard would be empty.
    """
    n = len(manifest)
    if n < shard.count:
        raise ValueError(
            f"{n} images cannot be split into {shard.count} shards (each shard needs at least one image); "
            "use fewer processes"
        )
    start, stop = shard.rows(n)
    return Manifest(
        ids=manifest.ids[start:stop],
        paths=manifest.paths[start:stop],
        labels=manifest.labels[start:stop],
        splits=manifest.splits[start:stop],
        class_names=list(manifest.class_names),
        source=manifest.source,
        split_policy=manifest.split_policy,
    )


def shard_attrs(shard: Shard, job_key: str, n_rows: int) -> dict[str, str]:
    """The root attribute that places a shard store in its job (read back by :func:`join_shards`)."""
    start, stop = shard.rows(n_rows)
    info = {"index": shard.index, "count": shard.count, "start": start, "stop": stop, "job_key": job_key}
    return {"shard": canonical_json({**info, "job_rows": n_rows})}


def rerun_hint(path: str | Path, shard: Shard) -> str:
    """How to (re-)run one shard alone and then join."""
    return (
        f"re-run it alone with the same `featx extract` command plus `--shard {shard}` (no torchrun needed), "
        f"then `featx join {path}`"
    )


def check_agreement(reports: list[dict[str, Any]]) -> None:
    """Refuse to start when the ranks did not build the same job.

    Parameters
    ----------
    reports : list of dict
        Per rank (in rank order): ``key``, ``rows``, ``path`` and ``host``.

    Raises
    ------
    SpecMismatchError
        Naming which ranks differ in what, and the usual causes.
    """
    first = reports[0]
    problems = []
    for what in ("rows", "key", "path"):
        values = [r[what] for r in reports]
        if len(set(values)) > 1:
            shown = "; ".join(f"rank {i} ({r['host']}): {str(r[what])[:16]}" for i, r in enumerate(reports))
            problems.append(f"{what} differ ({shown})")
    if problems:
        raise SpecMismatchError(
            "the ranks disagree about the job, so their shards could not be joined: "
            + " and ".join(problems)
            + ". Every rank must see the same images and settings: the same SOURCE (on a shared filesystem, or "
            "identical copies with --fingerprint content, since copies get new modification times), the same "
            "options, backbone weights and library versions, and the same --out (or the same --store-dir/cache). "
            f"Rank 0 computed key {first['key'][:16]}… for {first['rows']} images"
        )


# -------------------------------------------------------------------------------------------- joining
@dataclass
class JoinResult:
    """What :func:`join_shards` did."""

    path: Path
    key: str
    n_shards: int
    n_images: int
    n_done: int
    n_failed: int
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


def _scan(folder: Path) -> dict[int, dict[int, str]]:
    """``{count: {index: "done" | "partial"}}`` for the shard files and folders in ``folder``."""
    layouts: dict[int, dict[int, str]] = {}
    for entry in folder.iterdir() if folder.is_dir() else ():
        m = _SHARD_FILE.fullmatch(entry.name)
        if not m:
            continue
        index, count, partial = int(m.group(1)), int(m.group(2)), bool(m.group(3))
        slot = layouts.setdefault(count, {})
        if not partial and entry.is_file():
            slot[index] = "done"
        elif partial and entry.is_dir():
            slot.setdefault(index, "partial")
    return layouts


def _merged_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The joined store's timing: shards ran side by side, so seconds is the slowest and rates add up."""
    seconds = max((s.get("seconds") or 0.0 for s in stats), default=0.0)
    images = sum(s.get("images_this_run") or 0 for s in stats)
    return {
        "seconds": seconds,
        "images": sum(s.get("images") or s.get("images_this_run") or 0 for s in stats),
        "images_this_run": images,
        "resumed_rows": sum(s.get("resumed_rows") or 0 for s in stats),
        "images_per_second": round(sum(s.get("images_per_second") or 0.0 for s in stats), 2) or None,
        "device": ", ".join(sorted({str(s.get("device")) for s in stats if s.get("device")})) or None,
        "batch_size": stats[0].get("batch_size") if stats else None,
        "shards": len(stats),
    }


def join_shards(
    path: str | Path,
    *,
    count: int | None = None,
    key: str | None = None,
    overwrite: bool = False,
    keep_shards: bool = False,
) -> JoinResult:
    """Join the shards in ``STORE.h5.shards/`` into ``STORE.h5``, the store one process would have written.

    Every shard must be there and complete, and all must come from the same job (spec, images and shard
    count) and cover the manifest's rows exactly once; otherwise nothing is written, nothing is deleted,
    and the error names each problem and how to fix it. The join copies the features into one
    self-contained file (see ``docs/distributed.md`` for why not an HDF5 virtual dataset); the shards are
    removed afterwards unless ``keep_shards``.

    Parameters
    ----------
    path : str or Path
        The store to produce (``--out`` of the sharded extraction).
    count : int, optional
        The number of shards; by default read from the shard file names (required if several layouts are
        present).
    key : str, optional
        The cache key the shards must have been made for (rank 0 passes the job's key); by default the
        shards only have to agree with each other.
    overwrite : bool, default=False
        Replace a store of another spec at ``path`` instead of refusing.
    keep_shards : bool, default=False
        Keep the shard stores after a successful join.

    Returns
    -------
    JoinResult

    Raises
    ------
    FileNotFoundError
        There are no shards for ``path``.
    IncompleteStoreError
        Shards are missing or unfinished.
    SpecMismatchError
        Shards from another job, spec, images or shard count, or row ranges that overlap or leave gaps.

    Examples
    --------
    >>> from featx.distributed import join_shards
    >>> join_shards("features.h5").n_images  # doctest: +SKIP
    1000
    """
    t0 = time.perf_counter()
    path = Path(path)
    layouts = _scan(shards_path(path))
    if not layouts:
        done = read_key(path)
        if done is not None and (key is None or done == key):  # joined before: nothing to do
            return _joined_result(path, t0, cached=True)
        raise FileNotFoundError(
            f"no shards to join for {path} (looked in {shards_path(path)}); extract them first, under torchrun or "
            "with `featx extract ... --shard INDEX/COUNT --out` this store"
        )
    count = _layout_to_join(path, layouts, count)
    _check_complete(path, layouts, count)
    paths = [shard_path(path, Shard(i, count)) for i in range(count)]
    infos, stats = _read_shards(paths)
    _check_shards(path, infos, count, key)
    job_key, first = infos[0]["job_key"], infos[0]
    spec = ExtractionSpec.from_dict(json.loads(first["spec"]))
    cached = check_replaceable(path, job_key, spec, first["manifest_fingerprint"], overwrite)
    if cached:
        log.info("%s already holds the joined store; nothing to do", path)
    else:
        concatenate(paths, path, key=job_key, stats=_merged_stats(stats))
    result = _joined_result(path, t0, cached=cached)
    if not keep_shards:
        _remove_shards(path, count, sorted(n for n in layouts if n != count))
    return result


def _layout_to_join(path: Path, layouts: dict[int, dict[int, str]], count: int | None) -> int:
    """The shard count to join: as given, or the only one present."""
    if count is None:
        if len(layouts) > 1:
            found = ", ".join(f"{n} shards ({len(idx)} present)" for n, idx in sorted(layouts.items()))
            raise SpecMismatchError(
                f"{shards_path(path)} holds shards of several layouts: {found}. Pass the shard count of the run to "
                "join (`featx join STORE --shards N`); the others come from an earlier run with another number of "
                "processes and can be deleted"
            )
        count = next(iter(layouts))
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    return count


def _check_complete(path: Path, layouts: dict[int, dict[int, str]], count: int) -> None:
    """Refuse to join while a shard of the layout is missing or unfinished, naming each and how to redo it."""
    present = layouts.get(count, {})
    problems = []
    for index in range(count):
        shard = Shard(index, count)
        state = present.get(index)
        if state == "done":
            continue
        if state == "partial":
            progress = partial_progress(shard_path(path, shard))
            done = f" ({progress[0] + progress[1]}/{progress[2]} rows)" if progress else ""
            problems.append(f"shard {index} of {count} is incomplete{done}; {rerun_hint(path, shard)}")
        else:
            problems.append(f"shard {index} of {count} is missing; {rerun_hint(path, shard)}")
    if not problems:
        return
    others = sorted(n for n in layouts if n != count)
    note = (
        f" ({shards_path(path)} also holds shards of a {', '.join(map(str, others))}-shard run: other shards do "
        "not count towards this one.)"
        if others
        else ""
    )
    if len(present) == 0:
        note += " If the ranks ran on several machines, is --out on a filesystem they all share?"
    raise IncompleteStoreError(
        f"cannot join {path}: "
        + "; ".join(problems[:8])
        + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        + "."
        + note
    )


def _read_shards(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each shard's place in its job (its ``shard`` attribute, rows held, keys) and its timing stats."""
    infos, stats = [], []
    for p in paths:
        with FeatureStore(p) as store:
            raw = store.attrs.get("shard")
            if raw is None:
                raise SpecMismatchError(f"{p} is a featx store but no shard (it has no shard attribute); move it away")
            info = json.loads(raw)
            info["rows_held"] = len(store)
            info["spec"] = store.attrs["spec"]
            info["store_key"] = store.key
            info["manifest_fingerprint"] = store.attrs["manifest_fingerprint"]
            infos.append(info)
            stats.append(json.loads(store.attrs.get("stats", "{}")))
    return infos, stats


def _check_shards(path: Path, infos: list[dict[str, Any]], count: int, key: str | None) -> None:
    """Refuse shards of other jobs, of another shard count, or whose row ranges do not tile the manifest."""
    problems = []
    expected = key or infos[0]["job_key"]
    for i, info in enumerate(infos):
        shard = Shard(i, count)
        if (info["index"], info["count"]) != (i, count):
            problems.append(
                f"{shard_path(path, shard).name} holds shard {info['index']} of {info['count']}, not {shard}: "
                "it was renamed or copied from another run; delete it and re-run that shard"
            )
        elif info["job_key"] != expected or info["store_key"] != shard.key(info["job_key"]):
            problems.append(
                f"shard {i} of {count} was made for another job (key {info['job_key'][:12]}…, expected "
                f"{expected[:12]}…: other images or settings); re-run it with the same `featx extract` command "
                f"as the other shards plus `--shard {shard} --overwrite`, then `featx join {path}`"
            )
    if not problems:
        rows = {info["job_rows"] for info in infos}
        if len(rows) > 1:
            problems.append(f"the shards disagree on the number of images ({sorted(rows)})")
        else:
            n = rows.pop()
            cursor = 0
            for i, info in enumerate(infos):
                start, stop = info["start"], info["stop"]
                want = Shard(i, count).rows(n)
                if (start, stop) != want:
                    kind = "overlaps the previous shard" if start < cursor else "leaves a gap" if start > cursor else ""
                    problems.append(
                        f"shard {i} of {count} covers rows {start}-{stop}, not {want[0]}-{want[1]} {kind}; "
                        f"delete {shard_path(path, Shard(i, count)).name} and re-run it"
                    )
                elif info["rows_held"] != stop - start:
                    problems.append(
                        f"shard {i} of {count} holds {info['rows_held']} rows, not {stop - start}; "
                        f"delete {shard_path(path, Shard(i, count)).name} and re-run it"
                    )
                cursor = stop
    if problems:
        raise SpecMismatchError(f"cannot join {path}: " + "; ".join(problems))


def _joined_result(path: Path, t0: float, cached: bool) -> JoinResult:
    with FeatureStore(path) as store:
        failures = store.failures
        stats = json.loads(store.attrs.get("stats", "{}"))
        return JoinResult(
            path=path,
            key=store.key,
            n_shards=int(stats.get("shards") or 0),
            n_images=len(store),
            n_done=len(store.rows()),
            n_failed=len(failures),
            failures=failures,
            seconds=time.perf_counter() - t0,
            cached=cached,
            stats=stats,
        )


def _remove_shards(path: Path, count: int, others: list[int]) -> None:
    """Remove the joined layout's shards (and their folder if nothing else is left in it)."""
    for index in range(count):
        p = shard_path(path, Shard(index, count))
        p.unlink(missing_ok=True)
        shutil.rmtree(p.with_name(p.name + ".partial"), ignore_errors=True)
    folder = shards_path(path)
    if others:
        log.warning("left shards of an earlier %s-shard run in %s", "/".join(map(str, others)), folder)
    with contextlib.suppress(OSError):  # other files are left in it
        folder.rmdir()


def _extract_shard(job: _Job, shard: Shard) -> ExtractionResult:
    """Extract one shard's rows into its own store under ``<out>.shards/``."""
    rows = shard_manifest(job.manifest, shard)
    attrs = shard_attrs(shard, job.key, len(job.manifest))
    result = _extract_store(job, shard_path(job.path, shard), shard.key(job.key), rows, attrs)
    result.shard = str(shard)
    return result


def _on_every_rank(world: World, step: str, path: Path, work: Callable[[], Any]) -> list[Any]:
    """Run ``work()`` on every rank and gather ``(error, value)``, so no rank waits for a rank that failed."""
    own = None
    try:
        value, error = work(), None
    except Exception as exc:
        value, error, own = None, f"{type(exc).__name__}: {exc}", exc
    reports = gather_objects(world, (error, value))
    if own is not None:
        raise own
    failed = [rank for rank, (err, _) in enumerate(reports) if err is not None]
    if failed:
        shards = ", ".join(f"--shard {Shard(rank, world.size)}" for rank in failed)
        raise RuntimeError(
            f"{step} failed on "
            + "; ".join(f"rank {rank}: {reports[rank][0]}" for rank in failed)
            + ". Finished shards are kept: fix the problem and re-run the same torchrun command (finished shards "
            f"are reused), or re-run each failed rank alone with the same `featx extract` command plus {shards}, "
            f"then `featx join {path}`"
        )
    return [value for _, value in reports]


def _extract_distributed(job: _Job, env: TorchrunEnv) -> ExtractionResult:
    """One rank of a torchrun job: agree on the key, extract shard RANK, and (rank 0) join after a barrier."""
    shard = Shard(env.rank, env.world_size)
    with process_group(env, job.device.type, timeout=BARRIER_TIMEOUT) as world:
        mine = {
            "key": job.key,
            "rows": len(job.manifest),
            "path": str(job.path.resolve()),
            "host": socket.gethostname(),
        }
        check_agreement(gather_objects(world, mine))
        cached = _on_every_rank(
            world,
            "checking the store",
            job.path,
            lambda: check_replaceable(job.path, job.key, job.spec, job.fingerprint, job.overwrite),
        )
        if all(cached):
            result = _cached_result(job, job.path, job.key, job.manifest)
            result.rank = env.rank
            return result
        if any(cached):
            seen = [rank for rank, hit in enumerate(cached) if hit]
            raise RuntimeError(
                f"only ranks {seen} see the finished store {job.path}: --out must be on a filesystem that every "
                "node shares"
            )
        runs = _on_every_rank(world, "extraction", job.path, lambda: _extract_shard(job, shard))
    mine_run = runs[env.rank]
    mine_run.rank = env.rank
    if env.rank != 0:
        return mine_run
    joined = join_shards(job.path, count=env.world_size, key=job.key, overwrite=job.overwrite)
    return _result(
        job,
        job.path,
        job.key,
        joined.n_images,
        cached=False,
        n_done=joined.n_done,
        n_failed=joined.n_failed,
        images_this_run=sum(r.images_this_run for r in runs),
        resumed_rows=sum(r.resumed_rows for r in runs),
        device=f"{env.world_size} × {job.device.type}",
        failures=joined.failures,
        rank=env.rank,
    )
