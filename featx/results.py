"""The results schema: one typed document per trained method, written and read here only.

A ``results.json`` is what ``featx train``, ``featx finetune`` and every cell of ``featx run`` leave behind,
and what ``featx compare`` reads back. Its sections are :class:`~typing.TypedDict` types, so the code that
builds them keeps using plain dicts and the JSON is exactly the dict. Two kinds share the top level
(:class:`ClassifierResults` for a classifier on cached features, :class:`FinetuneResults` for a fine-tuned
network) and both carry the same :class:`TestMetrics`.

Both kinds are built here too, by one envelope: :func:`header` (schema, kind, row name, versions, ``created_at``,
the pipeline cell passed in), :func:`split_section`, :func:`metrics_section` and :func:`assemble`, which puts them
around the stage's own part. A stage writes its document once; nothing re-reads a results file to amend it.

Keys marked optional below were added after the schema's first version or are written only sometimes; a
file without them still reads. A change that removes or renames a key bumps :data:`SCHEMA_VERSION`.

Example
-------
>>> from featx.results import read_results
>>> results = read_results("runs/quickstart/cells/digits__lite0__penultimate__svm/results.json")  # doctest: +SKIP
>>> results["test"]["accuracy"]  # doctest: +SKIP
0.9694
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

from featx._runtime.env import library_versions, timestamp
from featx._runtime.io import atomic_write
from featx.data.splits import SplitPlan, selection_rule
from featx.exceptions import NotResultsError, ResultsError  # raised here; defined once, with every featx error

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "SHARED_SECTIONS",
    "CellInfo",
    "ClassReport",
    "ClassifierResults",
    "ClassifierSettings",
    "EpochRecord",
    "FewShotPoint",
    "FinetuneResults",
    "FinetuneSettings",
    "Header",
    "LrSweepRun",
    "LrSweepSummary",
    "NotResultsError",
    "Predictions",
    "Results",
    "ResultsError",
    "SearchPoint",
    "SearchSummary",
    "SkippedImage",
    "SplitInfo",
    "StoreInfo",
    "TestMetrics",
    "TrainSummary",
    "ValScore",
    "assemble",
    "header",
    "metrics_section",
    "read_results",
    "split_section",
    "write_results",
]

SCHEMA_PREFIX = "featx.results/"
SCHEMA_VERSION = 1
#: The ``"schema"`` value of every results document this featx writes.
SCHEMA = f"{SCHEMA_PREFIX}{SCHEMA_VERSION}"


# -------------------------------------------------------------------------------------------- sections
# ``f1-score`` is not an identifier, hence the functional form (the keys are scikit-learn's).
ClassReport = TypedDict("ClassReport", {"precision": float, "recall": float, "f1-score": float, "support": float})


class _TestMetricsBase(TypedDict):
    n: int
    accuracy: float
    accuracy_ci95: list[float]  # [low, high]: Wilson's score interval (a percentile bootstrap before 0.1.1)
    balanced_accuracy: float
    macro_f1: float
    top5_accuracy: float | None  # None with five classes or fewer, or without scores
    per_class: dict[str, ClassReport]
    confusion_matrix: list[list[int]]


class TestMetrics(_TestMetricsBase, total=False):
    """The metrics of one split, the same for every method (:func:`featx.metrics.evaluate`)."""

    predict_seconds: float
    split: str
    predictions: Predictions  # classifiers: every image's prediction (absent from the oldest files)


class StoreInfo(TypedDict):
    """The feature store a classifier was trained on."""

    path: str
    key: str
    manifest_fingerprint: str | None
    spec: dict[str, Any]  # ExtractionSpec.to_dict()
    stats: dict[str, Any]  # the store's extraction stats


class ClassifierSettings(TypedDict):
    """:meth:`ClassifierConfig.to_dict() <featx.classify.ClassifierConfig.to_dict>` and what it resolved to."""

    classifier: str
    value: float | str  # "auto": searched
    grid: list[float] | None
    preprocess: list[str]  # the steps used (the preset's default resolved)
    cv: int
    class_weight: str | None
    scoring: str
    params: dict[str, Any]
    layer: str
    seed: int
    out_of_core: bool
    preset: str
    param: str | None  # the searched hyper-parameter (C, alpha, n_neighbors), None for none
    chosen: float | None


class _SearchPointBase(TypedDict):
    value: float
    mean: float
    std: float
    folds: list[float]


class SearchPoint(_SearchPointBase, total=False):
    """One grid value's score: mean and std over the folds, each fold's score, and whether its fits converged."""

    converged: bool  # every fold's fit stopped before max_iter (absent for estimators that do not iterate)
    n_iter: int  # the most iterations one fold's fit took


class _SearchSummaryBase(TypedDict):
    param: str
    scheme: str  # e.g. "5-fold stratified CV", "validation split"
    best: float | None
    curve: list[SearchPoint]
    seconds: float


class SearchSummary(_SearchSummaryBase, total=False):
    """The hyper-parameter search (:class:`featx.classify.search.SearchResult`)."""

    refined: list[SearchPoint]  # the values scored inside ±1 decade of the coarse best
    at_edge: bool  # the best is at an edge of the scored values even after widening
    widened: list[float]  # values added because the coarse best was at an edge
    stopped_early: float | None  # climbing C stopped after this value (the mean fell twice in a row)
    skipped: list[float]  # grid values not scored because of that stop
    converged: bool  # every fit of the search converged


class _TrainSummaryBase(TypedDict):
    n: int
    fit_seconds: float


class TrainSummary(_TrainSummaryBase, total=False):
    """How many images the final model was trained on, how long it took, and whether its fit converged."""

    val_n: int  # fine-tuning: the images it chose its epoch on
    converged: bool | None  # classifiers: the final fit stopped before max_iter (None: not iterative)
    n_iter: int | None  # classifiers: the iterations the final fit took
    max_iter: int | None  # classifiers: the limit it ran under (raised when the first try did not converge)


class Predictions(TypedDict):
    """Per-image predictions of one split, as parallel arrays (row i of each is image ``ids[i]``)."""

    ids: list[str]
    true: list[int]  # class indices into the model's class names
    predicted: list[int]
    top_classes: list[list[int]]  # per image, the k best classes, best first
    top_scores: list[list[float]]  # their scores (probabilities or decision values), rounded to 6 digits


class _FewShotPointBase(TypedDict):
    shots: int | str  # or "all"
    draws: int
    mean: float
    std: float
    accuracies: list[float]


class FewShotPoint(_FewShotPointBase, total=False):
    """Test accuracy with ``shots`` training images per class, over nested seeded draws."""

    ci95: list[float]  # [low, high]: t interval of the mean over the draws
    values: list[float | None]  # the hyper-parameter chosen inside each draw's k-shot set
    selection: str  # how it was chosen, e.g. "2-fold stratified CV", "fixed C=1 (one image per class)"


class ValScore(TypedDict):
    """The final model's score on the val images: what a comparison chooses its reference and best rows by (under
    refit ``train+val``, the score of the model fit on train alone, which val judged)."""

    accuracy: float
    n: int


class _SplitInfoBase(TypedDict):
    plan: dict[str, Any]  # SplitPlan.to_dict(): split_seed, val_fraction, test_fraction
    policy: str  # how the splits came about, in words
    hashes: dict[str, str]  # per split, "N:sha256-prefix" of its sorted ids (featx.data.splits.split_hashes)
    sizes: dict[str, int]  # the images each split held for this row (unreadable ones left out)
    rule: str  # the selection rule, e.g. "fit on train, hyper-parameters chosen on val, scored once on test"


class SplitInfo(_SplitInfoBase, total=False):
    """The split plan a row used (absent from the oldest files): rows agreeing on ``hashes`` used the same images."""

    refit: str  # what the tested model was fit on: "train" or "train+val" (featx.data.splits.REFITS; issue 24)


class _CellInfoBase(TypedDict):
    id: str
    dataset: str
    name: str
    backbone: str | None
    layer: str | None


class CellInfo(_CellInfoBase, total=False):
    """Which cell of a ``featx run`` job made the results (the job runner passes it to the stage: :func:`header`)."""

    seed: int  # the training seed of the cell (a row with ``seeds = [...]`` has one cell per seed)


class _FinetuneSettingsBase(TypedDict):
    backbone_lr_mult: float
    batch_size: int
    clip_grad: float
    crop_scale: list[float]
    dropout: float
    hidden: list[int]
    label_smoothing: float
    metric: str
    optimizer: str
    patience: int | None
    phases: list[dict[str, Any]]  # {"freeze", "epochs", "lr"}
    seed: int
    update_bn_stats: bool
    warmup: float
    weight_decay: float
    blocks: int
    init_head: str | None
    amp: str
    device: str


class FinetuneSettings(_FinetuneSettingsBase, total=False):
    """:meth:`FinetuneConfig.to_dict() <featx.finetune.FinetuneConfig.to_dict>` and how the run was set up."""

    val_fraction: float  # older files only; newer ones keep it in the split plan (``split.plan``)
    world_size: int
    flip: bool  # absent: training flipped
    lr: str  # "phases" or "auto"
    lr_candidates: list[float]
    max_minutes: float | None
    lr_chosen: float | None  # the base rate chosen on val; None when the phases fix every rate
    layer_decay: float  # absent: 1 (no decay)
    schedule: str  # "phase" or "run"; absent: "phase"


class EpochRecord(TypedDict):
    """One epoch of fine-tuning; epoch 0 (phase 0, freeze ``"start"``) is the model before any update, on val
    only (no training loss or rate). A diverged loss (NaN) is ``None``."""

    epoch: int
    phase: int
    freeze: str
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    lr_head: float | None
    lr_backbone: float | None
    images_per_second: float | None
    seconds: float


class LrSweepRun(TypedDict):
    """One candidate base rate of a fine-tune's learning-rate choice, and how it did on val."""

    lr: float
    val_loss: float | None
    val_accuracy: float
    train_loss: float | None
    seconds: float
    curve: list[EpochRecord]


class _LrSweepSummaryBase(TypedDict):
    phase: int  # 1-based: the phase whose first epoch each candidate trained
    freeze: str
    budget: str
    selected_by: str  # "val_loss" (a small val split) or "val_accuracy" (ties: val loss)
    candidates: list[float]
    runs: list[LrSweepRun]
    cut: list[float]  # candidates not tried: they would have ended past max_minutes
    max_minutes: float | None
    chosen: float
    seconds: float


class LrSweepSummary(_LrSweepSummaryBase, total=False):
    """The choice of a fine-tune's base learning rate on val (``results["lr_sweep"]``)."""

    at_edge: str | None  # "upper" / "lower": the chosen rate is the highest / lowest tried (absent before it)


class SkippedImage(TypedDict):
    """An image fine-tuning could not decode, and why."""

    id: str
    reason: str


# -------------------------------------------------------------------------------------------- documents
class _ResultsBase(TypedDict):
    schema: str  # SCHEMA
    method: str  # the row name in a comparison, e.g. "svm · efficientnet_lite0 · penultimate"
    train: TrainSummary
    test: TestMetrics | None  # None without a labelled test split
    versions: dict[str, str]
    created_at: str  # ISO 8601, UTC


class _ClassifierResultsBase(_ResultsBase):
    kind: Literal["classifier"]
    store: StoreInfo
    classifier: ClassifierSettings
    search: SearchSummary | None  # None when the value was fixed


class ClassifierResults(_ClassifierResultsBase, total=False):
    """The results of a classifier trained on a feature store (:func:`featx.classify.train`)."""

    split: SplitInfo
    val: ValScore
    few_shot: list[FewShotPoint]
    cell: CellInfo


class _FinetuneResultsBase(_ResultsBase):
    kind: Literal["finetune"]
    store: None
    source: str
    val_policy: str
    manifest_fingerprint: str | None
    backbone: str
    finetune: FinetuneSettings
    curves: list[EpochRecord]
    best_epoch: int | None
    skipped_images: list[SkippedImage]
    seconds: float


class FinetuneResults(_FinetuneResultsBase, total=False):
    """The results of a fine-tuned network (:func:`featx.finetune.finetune`)."""

    split: SplitInfo
    val: ValScore  # the chosen epoch's
    split_policy: str
    cell: CellInfo
    lr_sweep: LrSweepSummary  # when the learning rate was chosen on val
    refit: dict[str, Any]  # under refit "train+val": {"on", "epochs", "per_phase", "n", "seconds"} of the refit


Results = ClassifierResults | FinetuneResults

_KINDS: dict[str, type] = {"classifier": ClassifierResults, "finetune": FinetuneResults}


# ------------------------------------------------------------------------------------------- the envelope
#: The sections every results document has, whatever its kind: :func:`header`'s, then :func:`assemble`'s.
SHARED_SECTIONS = ("schema", "kind", "method", "split", "train", "val", "test", "versions", "created_at", "cell")


class _HeaderBase(TypedDict):
    schema: str
    kind: str
    method: str
    versions: dict[str, str]
    created_at: str


class Header(_HeaderBase, total=False):
    """What opens every results document: its schema, kind and row name, when and with what it was made, and
    the pipeline cell that made it (only under ``featx run``)."""

    cell: CellInfo


def header(
    kind: Literal["classifier", "finetune"],
    method: str,
    *,
    cell: CellInfo | None = None,
    created_at: str | None = None,
    versions: dict[str, str] | None = None,
) -> Header:
    """The header of a results document.

    Parameters
    ----------
    kind : {"classifier", "finetune"}
        Which of :class:`ClassifierResults` and :class:`FinetuneResults` the document is.
    method : str
        The row name in a comparison, e.g. ``"logreg · efficientnet_lite0 · penultimate"``.
    cell : CellInfo, optional
        Which cell of a ``featx run`` job made the results: passed in by the stage's caller, so the file is
        written once and never amended.
    created_at : str, optional
        When the results were made (ISO 8601, UTC): a classifier's is its model's; by default now
        (:func:`featx._runtime.env.timestamp`).
    versions : dict of str to str, optional
        The library versions the results were made with; by default this process's
        (:func:`featx._runtime.env.library_versions`, featx's among them).

    Returns
    -------
    Header
        ``schema``, ``kind``, ``method``, ``versions``, ``created_at`` and, when given, ``cell``.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown results kind {kind!r}; kinds are {', '.join(_KINDS)}")
    made = Header(
        schema=SCHEMA,
        kind=kind,
        method=method,
        versions=library_versions() if versions is None else versions,
        created_at=timestamp() if created_at is None else created_at,
    )
    return made | {"cell": cell} if cell is not None else made  # type: ignore[return-value]


def split_section(
    plan: SplitPlan, policy: str, hashes: Mapping[str, str], sizes: Mapping[str, int], refit: str = "train"
) -> SplitInfo:
    """The ``split`` section: which images the row trained, chose and was tested on, and under which rule.

    Rows whose sections agree on ``hashes`` used the same images, whichever kind they are.

    Parameters
    ----------
    plan : SplitPlan
        The split plan the row used.
    policy : str
        How the splits came about, in words (a store's or a manifest's ``split_policy``).
    hashes : dict of str to str
        Per split, the hash of its sorted ids (:func:`featx.data.splits.split_hashes`).
    sizes : dict of str to int
        The images each split held for this row (unreadable ones left out).
    refit : {"train", "train+val"}, default="train"
        What the tested model was fit on; recorded under ``refit`` when not the default, and in the rule.

    Returns
    -------
    SplitInfo
    """
    info = SplitInfo(
        plan=plan.to_dict(),
        policy=policy,
        hashes=dict(hashes),
        sizes=dict(sizes),
        rule=selection_rule(refit),
    )
    return info | {"refit": refit} if refit != "train" else info  # type: ignore[return-value]


def metrics_section(
    metrics: TestMetrics, predictions: Predictions, *, predict_seconds: float, split: str = "test"
) -> TestMetrics:
    """The ``test`` section (or, for ``featx evaluate``, any split's): the metrics, then the per-image predictions.

    (Not ``test_section``: pytest would collect a function of that name wherever a test module imports it.)

    Parameters
    ----------
    metrics : TestMetrics
        :func:`featx.metrics.evaluate`'s: accuracy with Wilson's interval, per-class report, confusion matrix.
    predictions : Predictions
        :func:`featx.metrics.predictions`'s: every image's id, true and predicted class and top scores.
    predict_seconds : float
        How long predicting the split took (recorded to 0.1 ms).
    split : str, default="test"
        The split scored.

    Returns
    -------
    TestMetrics
    """
    return TestMetrics(**metrics, predict_seconds=round(predict_seconds, 4), split=split, predictions=predictions)


def assemble(
    head: Header,
    own: Mapping[str, Any],
    *,
    split: SplitInfo,
    train: TrainSummary,
    test: TestMetrics | None,
    val: ValScore | None = None,
) -> Results:
    """A complete results document: the header and the shared sections around the stage's own part.

    Parameters
    ----------
    head : Header
        :func:`header`'s.
    own : mapping
        The sections only this kind has (a classifier's ``store``, ``classifier``, ``search``; a fine-tune's
        ``source``, ``finetune``, ``curves`` …); none may be one of :data:`SHARED_SECTIONS`.
    split : SplitInfo
        :func:`split_section`'s.
    train : TrainSummary
        How many images the final model was trained on, and how long it took.
    test : TestMetrics or None
        :func:`metrics_section`'s; ``None`` without a labelled test split.
    val : ValScore, optional
        The final model's score on val (what a comparison chooses rows by); left out without val images.

    Returns
    -------
    ClassifierResults or FinetuneResults
        According to ``head["kind"]``: what :func:`write_results` writes and :func:`read_results` reads back.

    Raises
    ------
    ValueError
        ``own`` holds a shared section, or the document lacks a section its kind requires (a featx bug: the
        file would not read back).
    """
    shared = sorted(set(own) & set(SHARED_SECTIONS))
    if shared:
        raise ValueError(f"a stage's own part must not hold the shared sections {shared}; pass them to assemble()")
    document = {
        "schema": head["schema"],
        "kind": head["kind"],
        "method": head["method"],
        **own,
        "split": split,
        "train": train,
        **({"val": val} if val is not None else {}),
        "test": test,
        "versions": head["versions"],
        "created_at": head["created_at"],
        **({"cell": head["cell"]} if "cell" in head else {}),
    }
    missing = sorted(_KINDS[head["kind"]].__required_keys__ - document.keys())
    if missing:
        raise ValueError(f"a {head['kind']} results document needs {', '.join(map(repr, missing))}; it lacks them")
    return document  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- write/read
def write_results(path: str | Path, results: Results | TestMetrics | Mapping[str, Any]) -> Path:
    """Write a results document (or, for ``featx evaluate --out``, one split's :class:`TestMetrics`) atomically.

    Parameters
    ----------
    path : str or Path
        The file to write; a reader sees the previous file or this one, never half of one.
    results : ClassifierResults, FinetuneResults or TestMetrics
        NumPy scalars and arrays are written as JSON numbers and lists; NaN is refused.

    Returns
    -------
    Path
        ``path``.
    """
    text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_results(path: str | Path) -> Results:
    """Read a results document and check its schema.

    Parameters
    ----------
    path : str or Path
        A ``results.json`` written by featx (this version or an earlier one of the same schema).

    Returns
    -------
    ClassifierResults or FinetuneResults
        According to its ``"kind"``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    NotResultsError
        The file is JSON but has no featx ``"schema"`` field (some other tool's file).
    ResultsError
        The file is not complete JSON, was written by a newer featx, has an unknown kind or lacks a section;
        the message names the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc}); was it written completely?") from None
    return _check(data, path)


def _check(data: Any, path: Path) -> Results:
    schema = data.get("schema") if isinstance(data, dict) else None
    if not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX)):
        raise NotResultsError(f"{path} is not a featx results file (no {SCHEMA_PREFIX}N 'schema' field)")
    if schema != SCHEMA:
        version = schema[len(SCHEMA_PREFIX) :]
        newer = version.isdigit() and int(version) > SCHEMA_VERSION
        raise ResultsError(
            f"{path} has schema {schema!r}; this featx reads {SCHEMA!r}"
            + ("; it was written by a newer featx: upgrade featx to read it" if newer else "")
        )
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ResultsError(f"{path}: unknown results kind {kind!r}; kinds are {', '.join(_KINDS)}")
    missing = sorted(_KINDS[kind].__required_keys__ - data.keys())
    if missing:
        raise ResultsError(f"{path}: a {kind} results file needs {', '.join(map(repr, missing))}; it is incomplete")
    return data  # type: ignore[return-value]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
