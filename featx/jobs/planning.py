"""A job's tasks in dependency order (extractions, classifier cells, fine-tunes) and where each keeps its files.

A task is what a unit of work *is*: frozen, one type per kind (:class:`ExtractTask`, :class:`ClassifyTask`,
:class:`FinetuneTask`), with its dependencies, its folder and its row key as attributes. What happens to it in a
run (status, time, the store found) is the runner's (:class:`featx.jobs.runner.TaskRun`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from featx.data.splits import SplitPlan
from featx.jobs.schema import BackboneSpec, ClassifierSpec, DatasetSpec, FinetuneSpec, Job, job_error
from featx.jobs.values import CELL_SEPARATOR
from featx.spec import canonical_json

__all__ = ["CellTask", "ClassifyTask", "ExtractTask", "FinetuneTask", "Task", "cell_dir", "plan", "row_key"]


# ----------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class ExtractTask:
    """Extract a dataset's features with the backbone of one ``[[backbones]]`` table: the store its cells read.

    Attributes
    ----------
    dataset : DatasetSpec
    backbone : BackboneSpec
    """

    kind: ClassVar[str] = "extract"
    #: An extraction depends on no other task.
    depends: ClassVar[tuple[str, ...]] = ()

    dataset: DatasetSpec
    backbone: BackboneSpec

    @property
    def id(self) -> str:
        """``extract/dataset/backbone``: what the run's log, ``run.json`` and ``--only`` name it by."""
        return f"{self.kind}/{self.dataset.name}/{self.backbone.name}"

    @property
    def names(self) -> tuple[str, ...]:
        """What ``--only`` matches besides the id: the dataset's and the backbone table's names."""
        return (self.dataset.name, self.backbone.name)


class _Cell:
    """What a classifier cell and a fine-tune share: the row, the repeat, the training seed and the names."""

    kind: ClassVar[str]
    table: ClassVar[str]  # the job file's table of the row
    dataset: DatasetSpec
    seed: int
    split_seed: int
    spec: ClassifierSpec | FinetuneSpec  # the row: its table in the job
    _row_names: tuple[str, ...]  # the names that make the row's key

    @property
    def name(self) -> str:
        """The row's name (its table's ``name``)."""
        return self.spec.name

    @property
    def plan(self) -> SplitPlan:
        """The split plan of this cell's repeat."""
        return self.dataset.plan_of(self.split_seed)

    @functools.cached_property
    def _names(self) -> tuple[str, ...]:
        """The row's names, then ``splitN`` for a repeat after the first and ``seedN`` for a row with several
        seeds: none for the first repeat or a single seed, so a dataset without ``repeats`` and a row without
        ``seeds`` keep their cells' names (and so their caches)."""
        repeat = (f"split{self.split_seed}",) if self.split_seed != self.dataset.split_seeds[0] else ()
        seeds = (f"seed{self.seed}",) if len(self.spec.seeds or ()) > 1 else ()
        return (*self._row_names, *repeat, *seeds)

    @property
    def id(self) -> str:
        """``kind/`` and the cell's names joined by ``/``: what the run's log, ``run.json`` and ``--only`` name it
        by (``classify/digits/lite0/penultimate/svm/split1/seed2``)."""
        return "/".join((self.kind, *self._names))

    @property
    def row(self) -> str:
        """The key of the cell's row: the same for the row's cells across training seeds and repeats (see
        :func:`row_key`)."""
        return "/".join((self.kind, *self._row_names))

    @property
    def folder(self) -> str:
        """The cell's folder name under ``cells/``: ``dataset__backbone__layer__classifier`` or
        ``dataset__finetune``, then any ``__splitN`` and ``__seedN``.

        Names in a job file never contain the separator (:func:`~featx.jobs.schema.load_job` refuses them), so
        the name is unique per cell; :func:`plan` refuses whatever collision remains (layers that read alike
        once made safe for a file name, names that differ only in case).
        """
        # A '/' in a name given in Python becomes a separator, as it always has: cached cells keep their folders.
        return _slug(CELL_SEPARATOR.join(self._names).replace("/", CELL_SEPARATOR))


@dataclass(frozen=True)
class ClassifyTask(_Cell):
    """Fit one ``[[classifiers]]`` row on one layer of one store, under one split repeat and one training seed.

    Attributes
    ----------
    extraction : ExtractTask
        The extraction whose store the cell reads: its one dependency.
    classifier : ClassifierSpec
    layer : str
    seed : int
        The training seed (the job's, or one of the row's ``seeds``).
    split_seed : int
        The split seed of the cell's repeat (the dataset's ``split_seed`` for the first).
    """

    kind: ClassVar[str] = "classify"
    table: ClassVar[str] = "classifiers"

    extraction: ExtractTask
    classifier: ClassifierSpec
    layer: str
    seed: int
    split_seed: int

    @property
    def dataset(self) -> DatasetSpec:
        """The dataset of the extraction."""
        return self.extraction.dataset

    @property
    def backbone(self) -> BackboneSpec:
        """The ``[[backbones]]`` table of the extraction."""
        return self.extraction.backbone

    @property
    def spec(self) -> ClassifierSpec:
        """The row: the ``[[classifiers]]`` table."""
        return self.classifier

    @property
    def depends(self) -> tuple[str, ...]:
        """The extraction's id."""
        return (self.extraction.id,)

    @property
    def names(self) -> tuple[str, ...]:
        """What ``--only`` matches besides the id: the row's, the dataset's and the backbone table's names, the
        folder."""
        return (self.classifier.name, self.dataset.name, self.backbone.name, self.folder)

    @property
    def _row_names(self) -> tuple[str, ...]:
        return _names_of_row(self.kind, self.dataset.name, self.classifier.name, self.backbone.name, self.layer)


@dataclass(frozen=True)
class FinetuneTask(_Cell):
    """Fine-tune one ``[[finetune]]`` row on a dataset, under one split repeat and one training seed.

    Attributes
    ----------
    dataset : DatasetSpec
    finetune : FinetuneSpec
    seed : int
        The training seed (the job's, or one of the row's ``seeds``).
    split_seed : int
        The split seed of the cell's repeat (the dataset's ``split_seed`` for the first).
    backbone : BackboneSpec or None
        The ``[[backbones]]`` table the row's ``backbone`` names, if it names one (else it names a network).
    probe : ClassifyTask or None
        An LP-FT's linear probe, whose head it starts from: the ``init_head`` row's cell on the penultimate layer
        of the same dataset, backbone and repeat. Its one dependency.
    """

    kind: ClassVar[str] = "finetune"
    table: ClassVar[str] = "finetune"

    dataset: DatasetSpec
    finetune: FinetuneSpec
    seed: int
    split_seed: int
    backbone: BackboneSpec | None = None
    probe: ClassifyTask | None = None

    @property
    def network(self) -> str:
        """The backbone to fine-tune: that of the ``[[backbones]]`` table the row names, else the name itself."""
        return self.backbone.backbone if self.backbone is not None else self.finetune.backbone

    @property
    def spec(self) -> FinetuneSpec:
        """The row: the ``[[finetune]]`` table."""
        return self.finetune

    @property
    def depends(self) -> tuple[str, ...]:
        """The probe's id, for an LP-FT."""
        return (self.probe.id,) if self.probe is not None else ()

    @property
    def names(self) -> tuple[str, ...]:
        """What ``--only`` matches besides the id: the row's and the dataset's names, the folder."""
        return (self.finetune.name, self.dataset.name, self.folder)

    @property
    def _row_names(self) -> tuple[str, ...]:
        return _names_of_row(self.kind, self.dataset.name, self.finetune.name)


#: A cell: a task with results of its own (a folder under ``cells/``, a row of the report).
CellTask = ClassifyTask | FinetuneTask
#: Any task of a job.
Task = ExtractTask | ClassifyTask | FinetuneTask


def row_key(kind: str, dataset: str, name: str, backbone: str | None = None, layer: str | None = None) -> str:
    """The key of a pipeline row: what its cells share across training seeds and split repeats.

    The report groups a run's results by it, read from the fields their ``cell`` section records, and names
    rows that read alike with it. It is :attr:`ClassifyTask.row` or :attr:`FinetuneTask.row`.

    Parameters
    ----------
    kind : {"classify", "finetune"}
    dataset, name : str
        The dataset's and the row's names in the job.
    backbone, layer : str, optional
        A classifier row's ``[[backbones]]`` table and layer (a fine-tune's do not enter its key).

    Returns
    -------
    str
        ``classify/dataset/backbone/layer/name`` (the layer made safe for a file name) or ``finetune/dataset/name``.
    """
    return "/".join((kind, *_names_of_row(kind, dataset, name, backbone, layer)))


def _names_of_row(
    kind: str, dataset: str, name: str, backbone: str | None = None, layer: str | None = None
) -> tuple[str, ...]:
    if kind == ClassifyTask.kind and backbone is not None and layer is not None:
        return (dataset, backbone, _slug(layer), name)
    if kind == FinetuneTask.kind:
        return (dataset, name)
    raise ValueError(
        f"row_key of kind {kind!r} with backbone {backbone!r} and layer {layer!r}: a row is 'classify' (with its "
        "backbone and layer) or 'finetune'"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-")


# ------------------------------------------------------------------------------------------------ plan
def plan(job: Job) -> list[Task]:
    """The tasks of a job in dependency order: extractions, then classifier cells, then fine-tuning.

    Raises
    ------
    JobError
        Two cells would share a folder (see :attr:`ClassifyTask.folder`); nothing has been written then.
    """
    tasks = _tasks(job)
    _check_folders(job, tasks)
    return tasks


def _tasks(job: Job) -> list[Task]:
    tasks: list[Task] = []
    for ds in job.datasets:
        for bb in job.backbones:
            extraction = ExtractTask(ds, bb)
            tasks.append(extraction)
            for clf in job.classifiers:
                if clf.backbones is not None and bb.name not in clf.backbones:
                    continue
                for layer in clf.layers or bb.layers:
                    if layer not in bb.layers:
                        continue
                    tasks += [
                        ClassifyTask(extraction, clf, layer, seed=seed, split_seed=split_seed)
                        for split_seed in ds.split_seeds
                        for seed in clf.seeds or (job.seed,)
                    ]
        for ft in job.finetune:
            bb = _backbone_of(job, ft)
            for split_seed in ds.split_seeds:
                probe = _probe(tasks, ds, bb, ft, split_seed)
                tasks += [FinetuneTask(ds, ft, seed, split_seed, bb, probe) for seed in ft.seeds or (job.seed,)]
    return tasks


def _probe(
    tasks: list[Task], ds: DatasetSpec, bb: BackboneSpec | None, ft: FinetuneSpec, split_seed: int
) -> ClassifyTask | None:
    """An LP-FT fine-tune's probe: the logreg cell of the same dataset, backbone and split (its first seed: a
    logistic regression's seed does not change its fit)."""
    if not ft.init_head or bb is None:
        return None
    return next(
        (
            t
            for t in tasks
            if isinstance(t, ClassifyTask)
            and t.dataset == ds
            and t.split_seed == split_seed
            and t.classifier.name == ft.init_head
            and t.layer == "penultimate"
            and t.backbone == bb
        ),
        None,
    )


def _backbone_of(job: Job, ft: FinetuneSpec) -> BackboneSpec | None:
    """The ``[[backbones]]`` table a fine-tune's ``backbone`` names, if it names one (else it names a network)."""
    return next((b for b in job.backbones if b.name == ft.backbone), None)


def identity_hash(obj: Any) -> str:
    """The hash of a cell's identity (its canonical JSON), kept in its marker."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def cell_dir(job: Job, task: CellTask) -> Path:
    """Where a classifier or fine-tuning cell keeps its results: ``cells/`` and its :attr:`~ClassifyTask.folder`."""
    return job.out / "cells" / task.folder


def _check_folders(job: Job, tasks: list[Task]) -> None:
    """No two cells share a folder, compared ignoring case (as macOS and Windows file systems do)."""
    seen: dict[str, CellTask] = {}
    for task in tasks:
        if isinstance(task, ExtractTask):
            continue
        other = seen.setdefault(task.folder.casefold(), task)
        if other is not task:
            index = next((i for i, s in enumerate(getattr(job, task.table)) if s is task.spec), None)
            raise job_error(
                job,
                f"cells {other.id!r} and {task.id!r} would share the folder {job.out / 'cells' / task.folder} (one "
                "result would overwrite the other); rename a dataset, backbone, layer or classifier so that "
                "their folder names differ (letters, digits, '_', '-', '.'; compared ignoring case)",
                task.table,
                index,
                "name",
            )
