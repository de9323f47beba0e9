"""TODO docstring"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from featx.jobs.planning import Task, _backbone_of, _hash, cell_dir, plan
from featx.jobs.schema import Job, JobError, _classifier_config, _finetune_config

__all__ = ["RunSummary", "run"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- run
@dataclass
class RunSummary:
    """What a run did, task by task."""

    tasks: list[Task]
    seconds: float

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.tasks)

    @property
    def failed(self) -> list[Task]:
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
        Shell patterns on task ids or cell names (``svm``, ``classify/digits/*``); their dependencies run too.
    force : bool
        Redo selected cells even when their results are cached (extractions stay cached).
    dry_run : bool
        Print what is cached and what would run; nothing is computed (weights are loaded to compute keys).
    scheduler : str, optional
        Address of a Dask scheduler (``tcp://HOST:8786``): every classifier cell's search runs its folds on
        that cluster (see :func:`featx.cluster.scheduler`). Cells still run one after another here, reading
        their stores on this machine; the results, and so the cell cache, are the same as a local run's.
    """
    from featx.classify.cluster import scheduler as dask_scheduler

    t0 = time.perf_counter()
    with dask_scheduler(None if dry_run else scheduler):  # connect first: a bad address fails before any work
        return _run(job, only=only, force=force, dry_run=dry_run, progress=progress, t0=t0)


def _run(job: Job, *, only: Sequence[str], force: bool, dry_run: bool, progress: bool, t0: float) -> RunSummary:
    from tqdm.auto import tqdm

    job.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(job.out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    featx_logger = logging.getLogger("featx")
    previous_level = featx_logger.level
    featx_logger.addHandler(handler)
    if featx_logger.getEffectiveLevel() > logging.INFO:  # the log file always gets the INFO story
        featx_logger.setLevel(logging.INFO)
    try:
        tasks = plan(job)
        selected = _select(tasks, only)
        by_id = {t.id: t for t in tasks}
        log.info(
            "job %s: %d tasks (%d selected)%s", job.name, len(tasks), len(selected), " [dry run]" if dry_run else ""
        )
        bar = tqdm(total=len(selected), unit="task", desc=job.name, disable=not progress or dry_run, position=0)
        for task in tasks:
            if task.id not in selected:
                continue
            blocked = [d for d in task.depends if by_id[d].status in ("failed", "skipped")]
            if blocked:
                task.status, task.message = "skipped", f"depends on {', '.join(blocked)}, which did not finish"
            else:
                start = time.perf_counter()
                try:
                    _execute(job, task, by_id, force=force, dry_run=dry_run, progress=progress)
                except KeyboardInterrupt:
                    task.status, task.message = "failed", "interrupted"
                    raise
                except Exception as exc:  # one failing cell must not lose the others
                    task.status, task.message = "failed", f"{type(exc).__name__}: {exc}"
                    log.error("%s failed: %s\n%s", task.id, task.message, traceback.format_exc())
                task.seconds = time.perf_counter() - start
            log.info("%s: %s%s", task.id, task.status, f" ({task.message})" if task.message else "")
            bar.update(1)
        bar.close()
        summary = RunSummary([t for t in tasks if t.id in selected], time.perf_counter() - t0)
        (job.out / "run.json").write_text(
            json.dumps(
                {
                    "job": job.name,
                    "seconds": round(summary.seconds, 2),
                    "dry_run": dry_run,
                    "tasks": [
                        {"id": t.id, "status": t.status, "message": t.message, "seconds": round(t.seconds, 2)}
                        for t in summary.tasks
                    ],
                },
                indent=2,
            )
        )
        return summary
    finally:
        featx_logger.removeHandler(handler)
        featx_logger.setLevel(previous_level)
        handler.close()


def _select(tasks: list[Task], only: Sequence[str]) -> set[str]:
    if not only:
        return {t.id for t in tasks}
    by_id = {t.id: t for t in tasks}
    chosen = set()
    for t in tasks:
        names = [t.id] + [
            n
            for n in (
                t.classifier and t.classifier.name,
                t.finetune and t.finetune.name,
                t.dataset.name,
                t.backbone and t.backbone.name,
            )
            if n
        ]
        if any(fnmatch.fnmatch(n, pattern) for pattern in only for n in names):
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


def _execute(job: Job, task: Task, by_id: dict[str, Task], *, force: bool, dry_run: bool, progress: bool) -> None:
    from featx.extract.api import extract

    ds = task.dataset
    if task.kind == "extract":
        bb = task.backbone
        result = extract(
            ds.source,
            bb.backbone,
            layers=bb.layers,
            pool=bb.pool,
            dtype=bb.dtype,
            tta=bb.tta,
            decode=bb.decode,
            batch_size=bb.batch_size,
            device=job.device,
            workers=job.workers,
            seed=job.seed,
            test_fraction=ds.test_fraction,
            store_dir=job.out / "stores",
            max_failures="inf",
            progress=progress,
            dry_run=dry_run,
        )
        task.store = result.path
        task.status = "cached" if result.cached else ("planned" if dry_run else "done")
        if result.n_failed and not dry_run:
            task.message = f"{result.n_failed} images could not be read (see `featx info {result.path} --failures`)"
        return
    out = cell_dir(job, task)
    marker = out / "cell.json"
    if task.kind == "classify":
        store_task = by_id[task.depends[0]]
        from featx.store.format import read_key

        key = read_key(store_task.store) if store_task.store else None
        if key is None:  # dry run with a store still to extract
            task.status = "planned"
            return
        config = _classifier_config(task.classifier, job.seed, task.layer)
        identity = {
            "kind": "classify",
            "store_key": key,
            "config": config.to_dict(),
            "shots": list(task.classifier.shots) if task.classifier.shots else None,
            "draws": task.classifier.draws,
        }
    else:
        ft = task.finetune
        bb = _backbone_of(job, ft)
        backbone = bb.backbone if bb is not None else ft.backbone
        init_dir = cell_dir(job, by_id[task.depends[0]]) if task.depends else None
        identity = {
            "kind": "finetune",
            "dataset": dataclasses.asdict(ds),
            "backbone": backbone,
            "config": _finetune_config(ft, job.seed).to_dict(),
            "init_head": json.loads((init_dir / "cell.json").read_text())["hash"]
            if init_dir is not None and (init_dir / "cell.json").exists()
            else None,
        }
    digest = _hash(identity)
    cached = (
        not force
        and marker.exists()
        and (out / "results.json").exists()
        and json.loads(marker.read_text()).get("hash") == digest
    )
    if cached:
        task.status = "cached"
        return
    if dry_run:
        task.status = "planned"
        return
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a half-finished cell never reads as done
    if task.kind == "classify":
        from featx.classify.training import train

        shots = list(task.classifier.shots) if task.classifier.shots else None
        train(store_task.store, config, out_dir=out, shots=shots, draws=task.classifier.draws)
    else:
        from featx.finetune.trainer import finetune

        init_head = (init_dir / "model.skops") if init_dir is not None else None
        finetune(
            ds.source,
            backbone,
            _finetune_config(ft, job.seed),
            out,
            init_head=init_head,
            device=job.device,
            workers=job.workers,
            overwrite=True,
            progress=progress,
            test_fraction=ds.test_fraction,
        )
    results = json.loads((out / "results.json").read_text())
    results["cell"] = {
        "id": task.id,
        "dataset": ds.name,
        "name": (task.classifier or task.finetune).name,
        "backbone": task.backbone.name if task.backbone else ft.backbone,
        "layer": task.layer,
    }
    from featx.results import write_results

    write_results(out / "results.json", results)
    marker.write_text(json.dumps({"hash": digest, "identity": identity}, indent=2))
    task.status = "done"
