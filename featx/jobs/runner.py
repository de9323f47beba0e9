"""Running a planned job: each cell cached under the hash of what it depends on, failures kept to their cell.

A cell whose marker (``cell.json``) holds the hash of its identity and whose ``results.json`` reads is skipped;
the marker is written last, so a half-finished cell never reads as done, and a damaged marker or results file is
named and the cell redone. A cell runs under a lock (``cell.lock``, as a store's extraction does): a second
``featx run`` of the same pipeline skips the cells the first is running, saying so, and runs the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx._runtime.io import atomic_write, check_writable
from featx._runtime.lock import FileLock, LockHeld
from featx.exceptions import NotWritableError, StoreLockedError
from featx.jobs.planning import (
    CellTask,
    ClassifyTask,
    ExtractTask,
    FinetuneTask,
    Task,
    cell_dir,
    identity_hash,
    plan,
)
from featx.jobs.schema import Job, JobError, job_error
from featx.jobs.values import classifier_config, finetune_config
from featx.results import CellInfo, ResultsError, read_results

__all__ = ["RunSummary", "TaskRun", "run"]

log = logging.getLogger(__name__)

#: A cell's marker: the hash of its identity, written last, so a cell without it is redone.
CELL_MARKER = "cell.json"

#: A cell's lock file: held while a process runs the cell (see :class:`featx._runtime.lock.FileLock`).
CELL_LOCK = "cell.lock"


class _CellBusy(Exception):
    """Another process holds the cell's lock: this run leaves the cell to it."""


# ------------------------------------------------------------------------------------------------- run
@dataclass
class TaskRun:
    """One task in a run: the task (what it is, frozen) and what became of it here.

    Attributes
    ----------
    task : ExtractTask, ClassifyTask or FinetuneTask
    status : str
        ``pending``, then ``done``, ``cached``, ``planned`` (a dry run), ``failed`` or ``skipped``.
    message : str
        Why it failed or was skipped, or what was redone.
    seconds : float
    store : Path or None
        An extraction's store, once found or written (dry runs included).
    labels : str or None
        The labels fingerprint of an extraction's store, when found.
    """

    task: Task
    status: str = "pending"
    message: str = ""
    seconds: float = 0.0
    store: Path | None = None
    labels: str | None = None

    @property
    def id(self) -> str:
        """The task's id."""
        return self.task.id

    @property
    def kind(self) -> str:
        """The task's kind: ``extract``, ``classify`` or ``finetune``."""
        return self.task.kind


@dataclass
class RunSummary:
    """What a run did, task by task: a :class:`TaskRun` for each selected task, in the plan's order."""

    tasks: list[TaskRun]
    seconds: float

    def count(self, status: str) -> int:
        """How many tasks ended with ``status`` (``done``, ``cached``, ``failed``, ``skipped``, ``planned``)."""
        return sum(t.status == status for t in self.tasks)

    @property
    def failed(self) -> list[TaskRun]:
        """The tasks that failed."""
        return [t for t in self.tasks if t.status == "failed"]


def run(
    job: Job,
    *,
    only: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    scheduler: str | None = None,
) -> RunSummary:
    """Execute (or, with ``dry_run``, only plan) a job; cached cells are skipped, failures isolated.

    Parameters
    ----------
    only : sequence of str
        Shell patterns on task ids, row, dataset or backbone names, or cell folders (``svm``, ``classify/digits/*``,
        ``digits__lite0__penultimate__svm``); their dependencies run too.
    force : bool
        Redo selected cells even when their results are cached (extractions stay cached).
    dry_run : bool
        Print what is cached and what would run; nothing is computed (weights are loaded to compute keys).
    scheduler : str, optional
        Address of a Dask scheduler (``tcp://HOST:8786``): every classifier cell's search runs its folds on
        that cluster (see :func:`featx.classify.cluster.scheduler`). Cells still run one after another here, reading
        their stores on this machine; the results, and so the cell cache, are the same as a local run's.
    """
    from featx.classify.cluster import scheduler as dask_scheduler

    t0 = time.perf_counter()
    with dask_scheduler(None if dry_run else scheduler):  # connect first: a bad address fails before any work
        return _run(job, only=only, force=force, dry_run=dry_run, progress=progress, t0=t0)


def _run(job: Job, *, only: Sequence[str], force: bool, dry_run: bool, progress: bool, t0: float) -> RunSummary:
    from featx._runtime.progress import Progress

    tasks = plan(job)  # refuses cells that would share a folder, before anything is written
    selected = _select(tasks, only)
    states = {t.id: TaskRun(t) for t in tasks}
    if (job.out.exists() and not job.out.is_dir()) or any(p.is_file() for p in job.out.parents):
        # load_job refuses it; a Job made in Python may not have been
        raise job_error(job, f"out {str(job.out)!r} is a file, or inside one: out must be a folder", "job", None, "out")
    if not dry_run:  # a dry run writes nothing: no folder, no run.log, no run.json
        try:  # creates it; a read-only mount, a folder this user may not write into, /proc: said with the line
            check_writable(job.out, "out")
        except NotWritableError as exc:
            raise job_error(job, f"{exc} (set out in [job])", "job", None, "out") from None
    with contextlib.nullcontext() if dry_run else _run_log(job.out / "run.log"):
        log.info(
            "job %s: %d tasks (%d selected)%s", job.name, len(tasks), len(selected), " [dry run]" if dry_run else ""
        )
        _check_layers(job, [t for t in tasks if t.id in selected])
        # Off a terminal each task logs its own line already: the bar then logs only its last line, the total.
        bar = Progress(
            len(selected),
            unit="task",
            desc=job.name,
            disable=not progress or dry_run,
            every_fraction=None,
            every_seconds=float("inf"),
        )
        for task in tasks:
            if task.id in selected:
                _run_task(job, states[task.id], states, force=force, dry_run=dry_run, progress=progress)
                bar.update(1)
        bar.close()
        summary = RunSummary([states[t.id] for t in tasks if t.id in selected], time.perf_counter() - t0)
        if not dry_run:
            _write_json(job.out / "run.json", _run_record(job, summary, dry_run))
        return summary


def _check_layers(job: Job, tasks: list[Task]) -> None:
    """Every layer of every [[backbones]] table to extract exists in its network, before any extraction starts.

    Layer names are the network's own graph nodes, so checking them needs the network, not its weights: each
    one that some table asks for a layer other than ``penultimate`` is built once here, without weights. A
    network that cannot be built is left to its extraction, which fails as its own cells.
    """
    from featx.backbones.loading import build_architecture
    from featx.backbones.names import PENULTIMATE, resolve_backbone
    from featx.exceptions import UnknownNameError

    extracted = {t.backbone.name for t in tasks if isinstance(t, ExtractTask)}
    tables: dict[str, list[int]] = {}  # backbone -> the indices of its tables in the job
    for index, bb in enumerate(job.backbones):
        if bb.name in extracted and set(bb.layers) - {PENULTIMATE}:
            tables.setdefault(bb.backbone, []).append(index)
    for backbone, indices in tables.items():
        try:
            net = build_architecture(resolve_backbone(backbone))
        except Exception as exc:  # the extraction reports it, as the failure of its cells
            log.warning("could not load %s to check its layers (%s); its extraction will say why", backbone, exc)
            continue
        for index in indices:
            try:
                net.check_layers(job.backbones[index].layers)
            except UnknownNameError as exc:
                raise job_error(job, str(exc), "backbones", index, "layers") from None
        log.info("layers of %s checked", backbone)
        del net


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Copy featx's log records to ``path`` for the duration; the ``featx`` logger's level is restored after.

    The file always gets the INFO story, so the logger is lowered to INFO while the run lasts if it was set higher.
    """
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    featx_logger = logging.getLogger("featx")
    previous_level = featx_logger.level
    featx_logger.addHandler(handler)
    if featx_logger.getEffectiveLevel() > logging.INFO:
        featx_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        featx_logger.removeHandler(handler)
        featx_logger.setLevel(previous_level)
        handler.close()


def _run_task(
    job: Job, state: TaskRun, states: dict[str, TaskRun], *, force: bool, dry_run: bool, progress: bool
) -> None:
    """Run one task unless a dependency did not finish; a failure is recorded on its run, not raised."""
    blocked = [d for d in state.task.depends if states[d].status in ("failed", "skipped")]
    if blocked:
        state.status, state.message = "skipped", f"depends on {', '.join(blocked)}, which did not finish"
    else:
        start = time.perf_counter()
        try:
            _execute(job, state, states, force=force, dry_run=dry_run, progress=progress)
        except KeyboardInterrupt:
            state.status, state.message = "failed", "interrupted"
            raise
        except _CellBusy as busy:
            state.status, state.message = "skipped", str(busy)
            log.warning("%s: %s", state.id, busy)
        except StoreLockedError as exc:  # another run of the pipeline is extracting this store
            state.status, state.message = "skipped", str(exc)
            log.warning("%s: %s", state.id, exc)
        except Exception as exc:  # one failing cell must not lose the others
            state.status, state.message = "failed", f"{type(exc).__name__}: {exc}"
            log.error("%s failed: %s\n%s", state.id, state.message, traceback.format_exc())
        state.seconds = time.perf_counter() - start
    # A dry run's plan is the caller's to print (`featx run --dry-run` lists each task once); a run logs its story.
    log.log(
        logging.DEBUG if dry_run else logging.INFO,
        "%s: %s%s",
        state.id,
        state.status,
        f" ({state.message})" if state.message else "",
    )


def _run_record(job: Job, summary: RunSummary, dry_run: bool) -> dict[str, Any]:
    """The content of ``run.json``: each selected task's status, message and time."""
    return {
        "job": job.name,
        "seconds": round(summary.seconds, 2),
        "dry_run": dry_run,
        "tasks": [
            {"id": t.id, "status": t.status, "message": t.message, "seconds": round(t.seconds, 2)}
            for t in summary.tasks
        ],
    }


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _select(tasks: list[Task], only: Sequence[str]) -> set[str]:
    if not only:
        return {t.id for t in tasks}
    by_id = {t.id: t for t in tasks}
    chosen = set()
    for t in tasks:
        if any(fnmatch.fnmatch(n, pattern) for pattern in only for n in (t.id, *t.names)):
            chosen.add(t.id)
    if not chosen:
        raise JobError(f"--only {', '.join(only)} matches no task; tasks are: {', '.join(by_id)}")
    stack = list(chosen)
    while stack:
        for dep in by_id[stack.pop()].depends:
            if dep not in chosen:
                chosen.add(dep)
                stack.append(dep)
    return chosen


def _execute(
    job: Job, state: TaskRun, states: dict[str, TaskRun], *, force: bool, dry_run: bool, progress: bool
) -> None:
    """Run one task, or mark it ``cached`` (its results are there for the same identity) or ``planned``."""
    task = state.task
    if isinstance(task, ExtractTask):
        _extract(job, state, dry_run=dry_run, progress=progress)
        return
    identity = _cell_identity(job, task, states)
    if identity is None:  # dry run with a store still to extract
        state.status = "planned"
        return
    out = cell_dir(job, task)
    marker = out / CELL_MARKER
    digest = identity_hash(identity)
    cached, damage = _cached(out, digest)
    if not force and cached:
        state.status = "cached"
        return
    if dry_run:
        state.status = "planned"
        state.message = f"to redo: {damage}" if damage else ""
        return
    out.mkdir(parents=True, exist_ok=True)
    with _cell_lock(out):
        cached, damage = _cached(out, digest)  # another run may have finished it while this one got here
        if not force and cached:
            state.status = "cached"
            return
        if damage:
            log.warning("%s: %s; the cell is done again", state.id, damage)
        marker.unlink(missing_ok=True)  # a half-finished cell never reads as done
        if isinstance(task, ClassifyTask):
            _train_cell(task, states[task.extraction.id], out)
        else:
            _finetune_cell(job, task, out, progress=progress)
        _write_json(marker, {"hash": digest, "identity": identity})  # last: the cell now reads as done
    state.status = "done"
    state.message = f"redone: {damage}" if damage else ""


@contextlib.contextmanager
def _cell_lock(out: Path) -> Iterator[None]:
    """Hold the cell's lock while it runs; :class:`_CellBusy` naming the holder when another process has it."""
    lock = FileLock(out / CELL_LOCK)
    try:
        lock.acquire()
    except LockHeld as exc:
        raise _CellBusy(
            f"another featx run ({exc.holder}) is running this cell; this run leaves it to that one. Run again "
            "when it has finished: the cell is then cached and in the report"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _extract(job: Job, state: TaskRun, *, dry_run: bool, progress: bool) -> None:
    from featx.extract.api import extract

    bb, ds = state.task.backbone, state.task.dataset
    # The table's options (amp is no pipeline key: the job's device decides the precision), the job's workers.
    options = dataclasses.replace(bb.options, workers=job.workers)
    result = extract(
        ds.source,
        bb.backbone,
        layers=bb.layers,
        options=options,
        device=job.device,
        store_dir=job.out / "stores",
        max_failures="inf",
        progress=progress,
        dry_run=dry_run,
    )
    state.store, state.labels = result.path, result.labels_fingerprint
    state.status = "cached" if result.cached else ("planned" if dry_run else "done")
    if result.n_failed and not dry_run:
        state.message = f"{result.n_failed} images could not be read (see `featx info {result.path} --failures`)"


def _cell_identity(job: Job, task: CellTask, states: dict[str, TaskRun]) -> dict[str, Any] | None:
    """What a cell's results depend on (hashed into its cache key); None while its store is still to extract."""
    if isinstance(task, ClassifyTask):
        from featx.store.format import read_key, read_labels_fingerprint

        extraction = states[task.extraction.id]
        store = extraction.store
        key = read_key(store) if store else None
        if key is None:
            return None
        config = classifier_config(task.classifier, task.seed, task.layer)
        return {
            "kind": "classify",
            "store_key": key,
            # The key covers the images only: the labels layer and the split plan are the cell's too.
            # A dry run leaves a relabelled store as it is: the labels it would hold come with the extraction.
            "labels": extraction.labels or read_labels_fingerprint(store),
            "split_plan": task.plan.identity(),
            **config.identity(),  # its settings, the preprocessing in force, the search's version
            "shots": _shots(task),
            "draws": task.classifier.draws,
        } | _refit_identity(task)
    init_marker = cell_dir(job, task.probe) / CELL_MARKER if task.probe is not None else None
    config = finetune_config(task.finetune, task.seed).identity(lp_ft=task.probe is not None)
    return {
        "kind": "finetune",
        # The dataset with the split seed of the task's repeat (the first repeat keeps its identity).
        "dataset": task.dataset.identity(task.plan.split_seed),
        "source": _source_fingerprint(task.dataset.source),  # new images or labels must re-run the fine-tune too
        "backbone": task.network,
        "config": config,  # what the fine-tune's checkpoint hashes too
        "init_head": _marker_hash(init_marker) if init_marker is not None else None,
    } | _refit_identity(task)


def _refit_identity(task: CellTask) -> dict[str, str]:
    """A cell's refit, in its identity only when not the default: cells cached before the option keep their hash."""
    refit = task.dataset.refit
    return {"refit": refit} if refit != "train" else {}


def _source_fingerprint(source: str) -> str | None:
    """What a fine-tune reads of its source: the images (paths, sizes, times) and the labels layer (ids, labels,
    source splits, classes). ``None`` when the source cannot be read now (the fine-tune then fails, saying why)."""
    from featx.data.sources import load_source

    try:
        return load_source(source).fingerprint("stat")
    except Exception:
        return None


def _marker_hash(marker: Path) -> str | None:
    """The identity hash a cell's marker holds; ``None`` when there is no marker, or a damaged one."""
    try:
        digest = _read_json(marker)["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


def _cached(out: Path, digest: str) -> tuple[bool, str | None]:
    """Whether the cell in ``out`` holds readable results for ``digest``; then, what is damaged (to name it).

    A marker that is not JSON, or results that do not read, make the cell one to redo: never a silent cache hit
    whose row the report would then drop.
    """
    marker = out / CELL_MARKER
    if not marker.exists():
        return False, None
    recorded = _marker_hash(marker)
    if recorded is None:
        return False, f"its marker {marker} is damaged (not the JSON featx writes)"
    if recorded != digest:
        return False, None
    try:
        read_results(out / "results.json")
    except FileNotFoundError:
        return False, None
    except ResultsError as exc:
        return False, f"its results do not read ({exc})"
    return True, None


def _train_cell(task: ClassifyTask, extraction: TaskRun, out: Path) -> None:
    from featx.classify.training import train

    config = classifier_config(task.classifier, task.seed, task.layer)
    train(
        extraction.store,
        config,
        plan=task.plan,
        out_dir=out,
        shots=_shots(task),
        draws=task.classifier.draws,
        cell=_cell_info(task),
        refit=task.dataset.refit,
    )


def _finetune_cell(job: Job, task: FinetuneTask, out: Path, *, progress: bool) -> None:
    from featx.finetune.trainer import finetune

    finetune(
        task.dataset.source,
        task.network,
        finetune_config(task.finetune, task.seed),
        out,
        init_head=cell_dir(job, task.probe) / "model.skops" if task.probe is not None else None,
        device=job.device,
        workers=job.workers,
        overwrite=True,
        progress=progress,
        plan=task.plan,
        cell=_cell_info(task),
        refit=task.dataset.refit,
    )


def _cell_info(task: CellTask) -> CellInfo:
    """Which cell of the job a task is, for its results: the report groups rows by these fields (the row key,
    :func:`~featx.jobs.planning.row_key`, is made of them; the split seed is in the results' split plan)."""
    classify = isinstance(task, ClassifyTask)
    return CellInfo(
        id=task.id,
        dataset=task.dataset.name,
        name=task.name,
        backbone=task.backbone.name if classify else task.finetune.backbone,
        layer=task.layer if classify else None,
        seed=task.seed,
    )


def _shots(task: ClassifyTask) -> list[Any] | None:
    return list(task.classifier.shots) if task.classifier.shots else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
