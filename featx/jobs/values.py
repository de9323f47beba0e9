"""The values of a pipeline's tables checked (types, ranges, names, references) and turned into configs.

:func:`~featx.jobs.schema.load_job` reads the file and calls these on each row; every check is the one of the
option's own module (:func:`featx.spec.check_option`, :meth:`featx.classify.ClassifierConfig.validate`, ...),
with the pipeline's own keys (types, lists, names) checked here. Nothing is loaded: backbones are resolved
without their weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx.data.splits import SplitPlan
from featx.spec import DEFAULT_BACKBONE, check_option

if TYPE_CHECKING:
    from featx.classify.config import ClassifierConfig
    from featx.finetune.config import FinetuneConfig
    from featx.jobs.schema import BackboneSpec, ClassifierSpec, DatasetSpec, FinetuneSpec

__all__ = [
    "CELL_SEPARATOR",
    "BadValue",
    "check_classifier_references",
    "check_finetune_references",
    "check_row",
    "classifier_config",
    "finetune_config",
]


Fail = Callable[[str, str], Exception]


#: Joins the names in a cell's folder (``dataset__backbone__layer__classifier``), so no name may contain it.
CELL_SEPARATOR = "__"


class BadValue(ValueError):
    """A value of a table that does not validate, with the key it is about (for the line of the error)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


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
    from featx.backbones.names import PENULTIMATE, resolve_backbone

    table = next((b for b in backbones if b.name == f.backbone), None)
    if table is None and f.init_head is None:
        try:
            resolve_backbone(f.backbone)
        except (ValueError, FileNotFoundError) as exc:
            tables = ", ".join(b.name for b in backbones) or "none"
            raise fail(
                f"backbone {f.backbone!r} is neither a [[backbones]] name ({tables}) nor a backbone: {exc}", "backbone"
            ) from None
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


def check_row(table: str, spec: Any) -> None:
    """Validate one ``[[table]]`` row's values without loading any model, by the checks of the options' own modules.

    Raises
    ------
    BadValue
        The message says what is wrong and how to write it; ``key`` is the key it is about.
    ValueError, TypeError, FileNotFoundError
        From the option's own check (the caller finds the key in the message).
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
    for key in ("split_seed", "val_fraction", "test_fraction"):
        try:
            SplitPlan(**{key: getattr(spec, key)})  # the plan's own check of each setting, one at a time
        except ValueError as exc:
            raise BadValue(key, str(exc)) from None
    if not _is_int(spec.repeats) or not 1 <= spec.repeats <= 100:
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
    for option in ("pool", "dtype", "tta", "decode"):
        try:
            check_option(option, getattr(spec, option))
        except ValueError as exc:
            raise BadValue(option, str(exc)) from None
    if not _is_int(spec.batch_size) or spec.batch_size < 1:
        raise BadValue("batch_size", f"batch_size must be a positive integer, got {spec.batch_size!r}")


def _check_classifier(spec: ClassifierSpec) -> None:
    from featx.classify.training import check_shots

    if spec.layers is not None:
        _check_layer_list(spec.layers, "layers", required=False)  # [] like no key: every layer of each store
    if spec.backbones is not None:
        _check_names_list(spec.backbones, "backbones", "[[backbones]] names", '["lite0"]')
        if not spec.backbones:
            raise BadValue("backbones", "backbones = [] applies the classifier to no backbone; drop the key for all")
    if spec.shots is not None:
        if not isinstance(spec.shots, tuple):
            raise BadValue(
                "shots", f'shots must be a list, e.g. shots = [1, 5, "all"] (images per class); got {spec.shots!r}'
            )
        try:
            check_shots(spec.shots)
        except ValueError as exc:
            raise BadValue("shots", str(exc)) from None
    if not _is_int(spec.draws) or spec.draws < 1:
        raise BadValue("draws", f"draws must be a positive integer, got {spec.draws!r}")
    _check_seeds(spec.seeds)
    classifier_config(spec, seed=0, layer=None).validate()


def _check_finetune(spec: FinetuneSpec) -> None:
    if not isinstance(spec.backbone, str):
        raise BadValue(
            "backbone", f"backbone must be a [[backbones]] name or a backbone SOURCE:NAME, got {spec.backbone!r}"
        )
    if spec.init_head is not None and not isinstance(spec.init_head, str):
        raise BadValue("init_head", f"init_head must be a [[classifiers]] name, got {spec.init_head!r}")
    _check_seeds(spec.seeds)
    _check_setting_types(spec.settings, "featx.finetune.config", "FinetuneConfig")
    finetune_config(spec, seed=0)


def _check_seeds(seeds: Any) -> None:
    """``seeds``: a non-empty list of distinct integers of 0 or more (one cell per training seed)."""
    if seeds is None:
        return
    if not isinstance(seeds, tuple) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise BadValue(
            "seeds", f"seeds must be a non-empty list of integers of 0 or more, e.g. [0, 1, 2]; got {seeds!r}"
        )
    twice = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if twice is not None:
        raise BadValue("seeds", f"seeds: {twice} is listed twice")


def _check_setting_types(settings: tuple[tuple[str, Any], ...], module: str, name: str) -> None:
    """Each setting of the type of its config field's default (a TOML file can hold anything), before the
    config's own checks compare values."""
    import dataclasses
    import importlib

    defaults = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    for key, value in settings:
        default = defaults.get(key, dataclasses.MISSING)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = _is_int(value), "an integer"
        elif isinstance(default, float):
            ok, kind = _is_number(value), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        elif isinstance(default, tuple):
            ok, kind = isinstance(value, tuple) and all(map(_is_number, value)), "a list of numbers"
        else:  # no default to compare with (None, or required): the config's own check
            continue
        if not ok:
            raise BadValue(key, f"{key} must be {kind} (its default is {_toml(default)}), got {value!r}")


def _toml(value: Any) -> str:
    """A default as it is written in a pipeline file."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def classifier_config(spec: ClassifierSpec, seed: int, layer: str | None) -> ClassifierConfig:
    """The :class:`~featx.classify.ClassifierConfig` of a ``[[classifiers]]`` row on one layer, with the job's seed."""
    from featx.classify.config import ClassifierConfig

    return ClassifierConfig(**dict(spec.settings), layer=layer, seed=seed)


def finetune_config(spec: FinetuneSpec, seed: int) -> FinetuneConfig:
    """The :class:`~featx.finetune.FinetuneConfig` of a ``[[finetune]]`` row (phases parsed), with the job's seed."""
    from featx.finetune.config import DEFAULT_PHASES, FinetuneConfig, parse_phases

    settings = dict(spec.settings)
    phases = tuple(parse_phases(settings.pop("phases", DEFAULT_PHASES)))
    return FinetuneConfig(phases=phases, **settings, seed=seed)
