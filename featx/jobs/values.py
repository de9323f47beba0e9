"""The rows of a pipeline's tables: one small class per table kind, each checked by the option tables of the
configs it builds, with the pipeline's own keys (names, lists, references) checked here.

A row's config keys are the options of its config's table (:func:`featx._runtime.params.options_of`) that a
pipeline may set: :class:`~featx.data.splits.SplitPlan` for ``[[datasets]]``,
:class:`~featx.spec.ExtractionOptions` for ``[[backbones]]``, :class:`~featx.classify.ClassifierConfig` and
:class:`~featx.classify.TrainRun` for ``[[classifiers]]``, :class:`~featx.finetune.FinetuneConfig` for
``[[finetune]]``. A row checks its values by building its configs, so every option has the one check of its
table. :func:`~featx.jobs.schema.load_job` reads the file and locates each error at its line; this module never
imports it. Nothing is loaded: backbones are resolved without their weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx._runtime.params import check_value, options_of
from featx.data.splits import FinalFit, SplitPlan
from featx.exceptions import InvalidOptionError
from featx.spec import DEFAULT_BACKBONE, ExtractionOptions

if TYPE_CHECKING:
    from featx.classify.config import ClassifierConfig, TrainRun
    from featx.finetune.config import FinetuneConfig

__all__ = [
    "CELL_SEPARATOR",
    "BackboneSpec",
    "BadValue",
    "ClassifierSpec",
    "DatasetSpec",
    "FinetuneSpec",
    "check_classifier_references",
    "check_finetune_references",
    "check_row",
    "classifier_config",
    "config_keys",
    "finetune_config",
]


Fail = Callable[[str, str], Exception]


#: Joins the names in a cell's folder (``dataset__backbone__layer__classifier``), so no name may contain it.
CELL_SEPARATOR = "__"


class BadValue(InvalidOptionError):
    """A value of a table that does not validate, with the key it is about (for the line of the error)."""


def _configs(table: str) -> tuple[type, ...]:
    """The configs whose option tables give a ``[[table]]`` row its settings."""
    if table == "datasets":
        return (SplitPlan, FinalFit)
    if table == "backbones":
        return (ExtractionOptions,)
    if table == "classifiers":
        from featx.classify.config import ClassifierConfig, TrainRun

        return (ClassifierConfig, TrainRun)
    from featx.finetune.config import FinetuneConfig

    return (FinetuneConfig,)


def config_keys(table: str) -> set[str]:
    """The options a ``[[table]]`` row may set: those of its configs' tables open to pipelines (the pipeline
    sets the others: a classifier's layer, the job's seed and workers)."""
    return {name for config in _configs(table) for name, (spec, _) in options_of(config).items() if spec.pipeline}


def _pick(settings: tuple[tuple[str, Any], ...], config: type) -> dict[str, Any]:
    """The settings that are options of ``config``'s table."""
    names = options_of(config)
    return {key: value for key, value in settings if key in names}


# ------------------------------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class DatasetSpec:
    """A ``[[datasets]]`` table: an image source (see :func:`featx.data.load_source`) and its split plan.

    Every row of the dataset (each classifier cell, each fine-tune) uses the one plan: the same train, val and
    test images. ``split_seed`` is the dataset's own, separate from the job's training ``seed``. With
    ``repeats = R`` every row runs under R plans, split seeds ``split_seed`` … ``split_seed + R - 1`` (the
    features are extracted once: splits are not in a store's key), so the decision counts split variance.
    """

    name: str
    source: str
    repeats: int = 1
    settings: tuple[tuple[str, Any], ...] = ()  # options of SplitPlan's and FinalFit's tables

    @property
    def plan(self) -> SplitPlan:
        """The dataset's first :class:`~featx.data.splits.SplitPlan` (split seed ``split_seed``)."""
        return SplitPlan(**_pick(self.settings, SplitPlan))

    @property
    def refit(self) -> str:
        """What every row's final model is fit on (:class:`~featx.data.splits.FinalFit`): ``train``, or again on
        ``train+val`` (each frozen row with its chosen hyper-parameter, each fine-tune for its chosen rate and
        number of epochs)."""
        return FinalFit(**_pick(self.settings, FinalFit)).refit

    @property
    def split_seeds(self) -> tuple[int, ...]:
        """The split seeds of the dataset's ``repeats``."""
        first = self.plan.split_seed
        return tuple(range(first, first + self.repeats))

    def plan_of(self, split_seed: int) -> SplitPlan:
        """The plan of one repeat."""
        return dataclasses.replace(self.plan, split_seed=split_seed)

    def identity(self, split_seed: int) -> dict[str, Any]:
        """What a cell depends on of its dataset under one repeat: its name, source and that repeat's plan."""
        return {"name": self.name, "source": self.source, **self.plan_of(split_seed).identity()}


@dataclass(frozen=True)
class BackboneSpec:
    """A ``[[backbones]]`` table: a backbone, its layers and the extraction options its stores are made with."""

    name: str
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] = ("penultimate",)
    settings: tuple[tuple[str, Any], ...] = ()  # options of ExtractionOptions' table

    @property
    def options(self) -> ExtractionOptions:
        """The table's :class:`~featx.spec.ExtractionOptions`."""
        return ExtractionOptions(**_pick(self.settings, ExtractionOptions))


@dataclass(frozen=True)
class ClassifierSpec:
    """A ``[[classifiers]]`` table: where it applies, plus any :class:`~featx.classify.ClassifierConfig` or
    :class:`~featx.classify.TrainRun` (``shots``, ``draws``) setting."""

    name: str
    layers: tuple[str, ...] | None = None  # None: every layer of each store
    backbones: tuple[str, ...] | None = None  # None: every backbone
    seeds: tuple[int, ...] | None = None  # training seeds, one cell each (None: the job's seed)
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def classifier(self) -> str:
        """The preset or import path of this table (the config's default when the table does not set it)."""
        from featx.classify.config import ClassifierConfig

        return dict(self.settings).get("classifier", ClassifierConfig.classifier)

    @property
    def run(self) -> TrainRun:
        """The table's learning-curve settings (``shots``, ``draws``)."""
        from featx.classify.config import TrainRun

        return TrainRun(**_pick(self.settings, TrainRun))

    @property
    def shots(self) -> tuple[int | str, ...] | None:
        """The learning curve's points, if any."""
        return self.run.shots

    @property
    def draws(self) -> int:
        """Seeded draws per learning-curve point."""
        return self.run.draws


@dataclass(frozen=True)
class FinetuneSpec:
    """A ``[[finetune]]`` table: backbone, LP-FT source, plus any :class:`~featx.finetune.FinetuneConfig` setting."""

    name: str
    backbone: str = DEFAULT_BACKBONE
    init_head: str | None = None  # a [[classifiers]] name (a logreg) for LP-FT
    seeds: tuple[int, ...] | None = None  # training seeds, one cell each (None: the job's seed)
    settings: tuple[tuple[str, Any], ...] = ()


def classifier_config(spec: ClassifierSpec, seed: int, layer: str | None) -> ClassifierConfig:
    """The :class:`~featx.classify.ClassifierConfig` of a ``[[classifiers]]`` row on one layer, with the job's seed."""
    from featx.classify.config import ClassifierConfig

    return ClassifierConfig(**_pick(spec.settings, ClassifierConfig), layer=layer, seed=seed)


def finetune_config(spec: FinetuneSpec, seed: int) -> FinetuneConfig:
    """The :class:`~featx.finetune.FinetuneConfig` of a ``[[finetune]]`` row, with the job's seed."""
    from featx.finetune.config import FinetuneConfig

    return FinetuneConfig(**_pick(spec.settings, FinetuneConfig), seed=seed)


# ---------------------------------------------------------------------------------------- the checks
def check_row(table: str, spec: Any) -> None:
    """Validate one ``[[table]]`` row's values without loading any model: its own keys here, its settings by
    building its configs (each option's one check, in its table).

    Raises
    ------
    InvalidOptionError
        The message says what is wrong and how to write it; ``key`` is the key it is about.
    ValueError, TypeError, FileNotFoundError
        From a check that names no key (the caller finds the key in the message).
    """
    {
        "datasets": _check_dataset,
        "backbones": _check_backbone,
        "classifiers": _check_classifier,
        "finetune": _check_finetune,
    }[table](spec)


def _check_dataset(spec: DatasetSpec) -> None:
    s = spec.source
    if not isinstance(s, str) or not s:
        raise BadValue(
            "source", f"source must be a string (a folder, archive, CSV, digits, torchvision:NAME), got {s!r}"
        )
    if not (s == "digits" or s.startswith("torchvision:") or Path(s).expanduser().exists()):
        raise ValueError(f"source {s!r} does not exist (sources: a folder, archive, CSV, digits, torchvision:NAME)")
    spec.plan  # noqa: B018  # SplitPlan's table checks each setting
    spec.refit  # noqa: B018  # and FinalFit's the refit
    if isinstance(spec.repeats, bool) or not isinstance(spec.repeats, int) or not 1 <= spec.repeats <= 100:
        raise BadValue(
            "repeats",
            f"repeats is the number of split seeds each row runs under, an integer from 1 to 100; got {spec.repeats!r}",
        )


def _check_backbone(spec: BackboneSpec) -> None:
    from featx.backbones.names import resolve_backbone

    if not isinstance(spec.backbone, str):
        raise BadValue(
            "backbone", f"backbone must be a string SOURCE:NAME (e.g. {DEFAULT_BACKBONE}), got {spec.backbone!r}"
        )
    try:
        resolve_backbone(spec.backbone)  # the name and tag exist here; no weights are loaded
    except (ValueError, FileNotFoundError) as exc:
        raise BadValue("backbone", str(exc)) from None
    _check_layer_list(spec.layers, "layers", required=True)
    spec.options  # noqa: B018  # ExtractionOptions' table checks each setting


def _check_classifier(spec: ClassifierSpec) -> None:
    if spec.layers is not None:
        _check_layer_list(spec.layers, "layers", required=False)  # [] like no key: every layer of each store
    if spec.backbones is not None:
        _check_names_list(spec.backbones, "backbones", "[[backbones]] names", '["lite0"]')
        if not spec.backbones:
            raise BadValue("backbones", "backbones = [] applies the classifier to no backbone; drop the key for all")
    _check_seeds(spec.seeds)
    spec.run  # noqa: B018  # TrainRun's table checks shots and draws
    classifier_config(spec, seed=0, layer=None)  # ClassifierConfig's table checks the rest


def _check_finetune(spec: FinetuneSpec) -> None:
    if not isinstance(spec.backbone, str):
        raise BadValue(
            "backbone", f"backbone must be a [[backbones]] name or a backbone SOURCE:NAME, got {spec.backbone!r}"
        )
    if spec.init_head is not None and not isinstance(spec.init_head, str):
        raise BadValue("init_head", f"init_head must be a [[classifiers]] name, got {spec.init_head!r}")
    _check_seeds(spec.seeds)
    finetune_config(spec, seed=0)  # FinetuneConfig's table checks every setting


def _check_seeds(seeds: Any) -> None:
    """``seeds``: a non-empty list of distinct training seeds (one cell per seed), each a valid seed."""
    from featx.finetune.config import FinetuneConfig

    if seeds is None:
        return
    if not isinstance(seeds, tuple) or not seeds:
        raise BadValue("seeds", f"seeds must be a non-empty list of seeds, e.g. [0, 1, 2]; got {seeds!r}")
    seed_option = options_of(FinetuneConfig)["seed"][0]  # the seed's own check (the classifiers' is the same)
    for seed in seeds:
        try:
            check_value("seed", seed, seed_option)
        except InvalidOptionError as exc:
            raise BadValue("seeds", f"seeds: {exc}") from None
    twice = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if twice is not None:
        raise BadValue("seeds", f"seeds: {twice} is listed twice")


def _check_names_list(value: Any, key: str, what: str, example: str) -> None:
    """A list of non-empty strings, each once (TOML gives a list; a single string is refused, never split)."""
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        got = (
            f"the string {value!r}"
            if isinstance(value, str)
            else repr(list(value) if isinstance(value, tuple) else value)
        )
        raise BadValue(key, f"{key} must be a list of {what}, e.g. {key} = {example}; got {got}")
    twice = next((v for i, v in enumerate(value) if v in value[:i]), None)
    if twice is not None:
        raise BadValue(key, f"{key}: {twice!r} is listed twice")


def _check_layer_list(layers: Any, key: str, required: bool) -> None:
    _check_names_list(layers, key, "layer names", '["penultimate"]')
    if required and not layers:
        raise BadValue(key, "layers must name at least one layer")
    for layer in layers:
        if CELL_SEPARATOR in layer:
            raise BadValue(
                key,
                f"layer {layer!r} contains {CELL_SEPARATOR!r}, which joins the names in a cell's folder "
                "(dataset__backbone__layer__classifier); name its module instead (a module means its last node)",
            )


def check_classifier_references(c: ClassifierSpec, backbones: tuple[BackboneSpec, ...], fail: Fail) -> None:
    """The backbones a classifier names exist, and each layer it names is extracted from one of them.

    Parameters
    ----------
    c : ClassifierSpec
    backbones : tuple of BackboneSpec
        Every ``[[backbones]]`` row.
    fail : callable
        ``fail(message, key)`` returns the error to raise (located at the key's line).
    """
    names = {b.name for b in backbones}
    for b in c.backbones or ():
        if b not in names:
            raise fail(f"classifier {c.name!r} names backbone {b!r}, which is not a [[backbones]] name", "backbones")
    applies = [b for b in backbones if c.backbones is None or b.name in c.backbones]
    for layer in c.layers or ():
        if not any(layer in b.layers for b in applies):
            listed = ", ".join(f"{b.name}: {', '.join(b.layers)}" for b in applies)
            raise fail(
                f"layer {layer!r} is not in the layers of any backbone this classifier applies to ({listed}); "
                "add it to a [[backbones]] table's layers, or drop it here",
                "layers",
            )


def check_finetune_references(
    f: FinetuneSpec, backbones: tuple[BackboneSpec, ...], classifiers: tuple[ClassifierSpec, ...], fail: Fail
) -> None:
    """A fine-tune's backbone is a [[backbones]] name or a backbone; its init_head names a logreg on that table.

    Parameters
    ----------
    f : FinetuneSpec
    backbones, classifiers : tuple of BackboneSpec, tuple of ClassifierSpec
        Every ``[[backbones]]`` and ``[[classifiers]]`` row.
    fail : callable
        ``fail(message, key)`` returns the error to raise (located at the key's line).
    """
    from featx.backbones.names import PENULTIMATE, check_trainable, resolve_backbone

    table = next((b for b in backbones if b.name == f.backbone), None)
    if table is None and f.init_head is None:
        try:
            name = resolve_backbone(f.backbone)
        except (ValueError, FileNotFoundError) as exc:
            tables = ", ".join(b.name for b in backbones) or "none"
            raise fail(
                f"backbone {f.backbone!r} is neither a [[backbones]] name ({tables}) nor a backbone: {exc}", "backbone"
            ) from None
    else:
        name = resolve_backbone(table.backbone) if table is not None else None  # a table's, checked with its table
    if name is not None:
        try:
            check_trainable(name)
        except ValueError as exc:
            raise fail(str(exc), "backbone") from None
    if f.init_head is None:
        return
    if table is None:
        raise fail(
            f"init_head needs backbone to name a [[backbones]] table (its logreg is trained on that "
            f"table's features), not {f.backbone!r}",
            "backbone",
        )
    target = next((c for c in classifiers if c.name == f.init_head), None)
    if target is None or target.classifier != "logreg":
        raise fail(
            f'init_head {f.init_head!r} must name a [[classifiers]] table with classifier = "logreg"', "init_head"
        )
    if PENULTIMATE not in table.layers or PENULTIMATE not in (target.layers or table.layers):
        raise fail(
            f"init_head {f.init_head!r}: its logreg must be trained on the penultimate layer of {table.name!r}",
            "init_head",
        )
    if target.backbones is not None and table.name not in target.backbones:
        raise fail(f"init_head {f.init_head!r}: that classifier does not apply to backbone {table.name!r}", "init_head")
