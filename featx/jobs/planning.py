"""A job's tasks in dependency order (extractions, classifier cells, fine-tunes) and where each keeps its files."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx.data.splits import SplitPlan
from featx.jobs.schema import BackboneSpec, ClassifierSpec, DatasetSpec, FinetuneSpec, Job, job_error
from featx.jobs.values import CELL_SEPARATOR
from featx.spec import canonical_json

__all__ = ["Task", "cell_dir", "cell_name", "plan"]


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Task:
    """One unit of work in a run."""

    id: str
    kind: str  # extract | classify | finetune
    dataset: DatasetSpec
    backbone: BackboneSpec | None = None
    classifier: ClassifierSpec | None = None
    finetune: FinetuneSpec | None = None
    layer: str | None = None
    seed: int = 0  # the training seed (the job's, or one of the row's ``seeds``)
    split_seed: int | None = None  # the repeat's split seed (None: the dataset's ``split_seed``)
    depends: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | cached | done | failed | skipped
    message: str = ""
    seconds: float = 0.0
    store: Path | None = None
    labels: str | None = None  # an extraction's labels fingerprint, when its store was found (dry runs included)

    @property
    def plan(self) -> SplitPlan:
        """The split plan of this task's repeat."""
        return self.dataset.plan_of(self.dataset.split_seed if self.split_seed is None else self.split_seed)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-")


def plan(job: Job) -> list[Task]:
    """The tasks of a job in dependency order: extractions, then classifier cells, then fine-tuning.

    Raises
    ------
    JobError
        Two cells would share a folder (see :func:`cell_name`); nothing has been written then.
    """
    tasks = _tasks(job)
    _check_folders(job, tasks)
    return tasks


def _tasks(job: Job) -> list[Task]:
    tasks: list[Task] = []
    for ds in job.datasets:
        for bb in job.backbones:
            ext = Task(f"extract/{ds.name}/{bb.name}", "extract", ds, backbone=bb)
            tasks.append(ext)
            for clf in job.classifiers:
                if clf.backbones is not None and bb.name not in clf.backbones:
                    continue
                for layer in clf.layers or bb.layers:
                    if layer not in bb.layers:
                        continue
                    for split_seed, split_suffix in _splits(ds):
                        for seed, suffix in _seeds(job, clf.seeds):
                            tasks.append(
                                Task(
                                    f"classify/{ds.name}/{bb.name}/{_slug(layer)}/{clf.name}{split_suffix}{suffix}",
                                    "classify",
                                    ds,
                                    backbone=bb,
                                    classifier=clf,
                                    layer=layer,
                                    seed=seed,
                                    split_seed=split_seed,
                                    depends=[ext.id],
                                )
                            )
        for ft in job.finetune:
            for split_seed, split_suffix in _splits(ds):
                depends = _probe(job, tasks, ds, ft, split_seed)
                for seed, suffix in _seeds(job, ft.seeds):
                    task = Task(
                        f"finetune/{ds.name}/{ft.name}{split_suffix}{suffix}",
                        "finetune",
                        ds,
                        finetune=ft,
                        seed=seed,
                        split_seed=split_seed,
                    )
                    tasks.append(dataclasses.replace(task, depends=list(depends)))
    return tasks


def _probe(job: Job, tasks: list[Task], ds: DatasetSpec, ft: FinetuneSpec, split_seed: int) -> list[str]:
    """An LP-FT fine-tune's probe: the logreg cell of the same dataset, backbone and split (its first seed: a
    logistic regression's seed does not change its fit)."""
    if not ft.init_head:
        return []
    bb = _backbone_of(job, ft)
    return [
        t.id
        for t in tasks
        if t.kind == "classify"
        and t.dataset == ds
        and t.split_seed == split_seed
        and t.classifier
        and t.classifier.name == ft.init_head
        and t.layer == "penultimate"
        and bb is not None
        and t.backbone == bb
    ][:1]


def _splits(ds: DatasetSpec) -> list[tuple[int, str]]:
    """A dataset's split seeds (``repeats``) and the suffix of each cell's id: none for the first, so the cells
    (and the caches) of a dataset without ``repeats`` keep their names."""
    return [(s, f"/split{s}" if i else "") for i, s in enumerate(ds.split_seeds)]


def _seeds(job: Job, seeds: tuple[int, ...] | None) -> list[tuple[int, str]]:
    """A row's training seeds and the suffix of each cell's id: none for a single seed, so the cells (and the
    caches) of a row without ``seeds`` keep their names."""
    if not seeds:
        return [(job.seed, "")]
    return [(s, f"/seed{s}" if len(seeds) > 1 else "") for s in seeds]


def _backbone_of(job: Job, ft: FinetuneSpec) -> BackboneSpec | None:
    return next((b for b in job.backbones if b.name == ft.backbone), None)


def _hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def cell_name(task: Task) -> str:
    """The folder name of a classifier or fine-tuning cell: ``dataset__backbone__layer__classifier`` or
    ``dataset__finetune``.

    Names in a job file never contain the separator (:func:`~featx.jobs.schema.load_job` refuses them), so the
    name is unique per cell; :func:`plan` refuses whatever collision remains (layers that read alike once
    made safe for a file name, names that differ only in case).
    """
    return _slug(task.id.split("/", 1)[1].replace("/", CELL_SEPARATOR))


def cell_dir(job: Job, task: Task) -> Path:
    """Where a classifier or fine-tuning cell keeps its results."""
    return job.out / "cells" / cell_name(task)


def _check_folders(job: Job, tasks: list[Task]) -> None:
    """No two cells share a folder, compared ignoring case (as macOS and Windows file systems do)."""
    seen: dict[str, Task] = {}
    for task in tasks:
        if task.kind == "extract":
            continue
        folder = cell_name(task)
        other = seen.setdefault(folder.casefold(), task)
        if other is not task:
            spec, table = (task.classifier, "classifiers") if task.classifier else (task.finetune, "finetune")
            index = next((i for i, s in enumerate(getattr(job, table)) if s is spec), None)
            raise job_error(
                job,
                f"cells {other.id!r} and {task.id!r} would share the folder {job.out / 'cells' / folder} (one "
                "result would overwrite the other); rename a dataset, backbone, layer or classifier so that "
                "their folder names differ (letters, digits, '_', '-', '.'; compared ignoring case)",
                table,
                index,
                "name",
            )
