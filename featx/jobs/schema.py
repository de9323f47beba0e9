"""Batch jobs: a TOML file declares datasets × backbones × classifiers (+ fine-tuning); ``run`` executes the grid.

Extraction happens once per (dataset, backbone) and is reused by every classifier on it; every cell's result
is cached under its configuration hash (which includes the store's key) and skipped when present. A failing
cell is recorded and the others go on; an interrupted run resumes (stores and fine-tuning checkpoint as they
go). The file is validated up front, with the line of each problem, before any model is loaded.

Example::

    [job]
    name = "quickstart"
    out = "runs/quickstart"
    seed = 0

    [vars]                      # ${data} below; override with `featx run JOB --set data=/elsewhere`
    data = "../shared/data"

    [[datasets]]
    name = "digits"
    source = "digits"

    [[backbones]]
    name = "lite0"
    backbone = "featx:efficientnet_lite0"
    layers = ["penultimate"]

    [[classifiers]]
    name = "svm"
    classifier = "svm"

    [[finetune]]
    name = "finetune"
    backbone = "lite0"          # a [[backbones]] name, or a backbone
    phases = "head:1:1e-3"
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx.data.splits import DEFAULT_TEST_FRACTION, check_test_fraction
from featx.spec import DEFAULT_BACKBONE, DEFAULT_DECODE, DEFAULT_DTYPE, DEFAULT_POOL, DEFAULT_TTA, check_option

__all__ = ["BackboneSpec", "ClassifierSpec", "DatasetSpec", "FinetuneSpec", "Job", "JobError", "load_job"]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class JobError(ValueError):
    """A pipeline file that does not validate; the message names the file, line and fix."""


# ---------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class DatasetSpec:
    """A ``[[datasets]]`` table: an image source (see :func:`featx.data.load_source`) and its test split."""

    name: str
    source: str
    test_fraction: float = DEFAULT_TEST_FRACTION


@dataclass(frozen=True)
class BackboneSpec:
    """A ``[[backbones]]`` table: a backbone and the extraction options its stores are made with."""

    name: str
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] = ("penultimate",)
    pool: str = DEFAULT_POOL
    dtype: str = DEFAULT_DTYPE
    tta: str = DEFAULT_TTA
    decode: str = DEFAULT_DECODE
    batch_size: int = 64


@dataclass(frozen=True)
class ClassifierSpec:
    """A ``[[classifiers]]`` table: where it applies, plus any :class:`~featx.classify.ClassifierConfig` setting."""

    name: str
    layers: tuple[str, ...] | None = None  # None: every layer of each store
    shots: tuple[Any, ...] | None = None
    draws: int = 5
    backbones: tuple[str, ...] | None = None  # None: every backbone
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def classifier(self) -> str:
        """The preset or import path of this table (the config's default when the table does not set it)."""
        from featx.classify.config import ClassifierConfig

        return dict(self.settings).get("classifier", ClassifierConfig.classifier)


@dataclass(frozen=True)
class FinetuneSpec:
    """A ``[[finetune]]`` table: backbone, LP-FT source, plus any :class:`~featx.finetune.FinetuneConfig` setting."""

    name: str
    backbone: str = DEFAULT_BACKBONE
    init_head: str | None = None  # a [[classifiers]] name (a logreg) for LP-FT
    settings: tuple[tuple[str, Any], ...] = ()


# Config fields a table may set; the pipeline sets the others (the layer from `layers`, the job's seed).
def _config_keys(table: str) -> set[str]:
    if table == "classifiers":
        from featx.classify.config import ClassifierConfig

        return {f.name for f in dataclasses.fields(ClassifierConfig)} - {"layer", "seed"}
    if table == "finetune":
        from featx.finetune.config import FinetuneConfig

        return {f.name for f in dataclasses.fields(FinetuneConfig)} - {"seed"}
    return set()


@dataclass(frozen=True)
class Job:
    """A validated pipeline: what to run and where to write it."""

    name: str
    out: Path
    seed: int
    datasets: tuple[DatasetSpec, ...]
    backbones: tuple[BackboneSpec, ...]
    classifiers: tuple[ClassifierSpec, ...] = ()
    finetune: tuple[FinetuneSpec, ...] = ()
    device: str = "auto"
    workers: int | None = None
    source_file: Path | None = None


_TABLES = {"datasets": DatasetSpec, "backbones": BackboneSpec, "classifiers": ClassifierSpec, "finetune": FinetuneSpec}


_JOB_KEYS = {"name", "out", "seed", "device", "workers"}


def _locate(text: str, table: str | None, index: int | None, key: str | None) -> int | None:
    """The 1-based line of ``key`` in the ``index``-th ``[[table]]`` (or ``[table]``), for error messages."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    if table is not None:
        headers = [
            i for i, ln in enumerate(lines) if re.match(rf"^\s*\[\[?\s*{re.escape(table)}\s*\]\]?\s*(#.*)?$", ln)
        ]
        if not headers:
            return None
        start = headers[min(index or 0, len(headers) - 1)]
        following = [i for i, ln in enumerate(lines) if i > start and re.match(r"^\s*\[", ln)]
        end = following[0] if following else len(lines)
        if key is None:
            return start + 1
    for i in range(start, end):
        if key is not None and re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1 if table is not None else None


def _unknown(what: str, name: str, choices: Sequence[str], kind: str, show=repr) -> str:
    """``unknown <what>; did you mean …? <Kind> are …`` for a job-file error."""
    from featx.exceptions import close_matches

    hint = close_matches(name, choices)
    suggestion = f"; did you mean {show(hint[0])}?" if hint else ""
    return f"unknown {what}{suggestion} {kind} are {', '.join(choices)}."


def _substitute(value: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match) -> str:
            if m.group(1) not in variables:
                raise JobError(
                    f"{where}: unknown variable ${{{m.group(1)}}}; define it under [vars] or pass "
                    f"--set {m.group(1)}=VALUE"
                )
            return variables[m.group(1)]

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


def load_job(path: str | Path, overrides: dict[str, str] | None = None) -> Job:
    """Read and validate a pipeline file; every problem is reported with its line and a fix.

    Parameters
    ----------
    path : str or Path
    overrides : dict, optional
        ``[vars]`` values set on the command line (``--set NAME=VALUE``).

    Raises
    ------
    JobError
        Unknown keys, bad values, missing sources, names that repeat or do not resolve.
    """
    path = Path(path)
    text, data = _read_toml(path)
    err = _Errors(path, text)
    _check_sections(data, err)
    variables = {k: str(v) for k, v in (data.get("vars") or {}).items()}
    variables.update(overrides or {})
    tables = {table: _build_table(data, table, cls, variables, err) for table, cls in _TABLES.items()}
    _check_references(tables, err)
    return _job(path, data.get("job", {}), tables, variables, err)


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    if not path.is_file():
        raise FileNotFoundError(f"pipeline file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None


class _Errors:
    """Builds a :class:`JobError` that starts with ``FILE:LINE`` of the table or key it is about."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def where(self, table: str | None = None, index: int | None = None, key: str | None = None) -> str:
        """``FILE:LINE`` of the key (or the table) an error is about; ``FILE`` alone when it cannot be found."""
        line = _locate(self.text, table, index, key)
        return f"{self.path}:{line}" if line else str(self.path)

    def __call__(
        self, message: str, table: str | None = None, index: int | None = None, key: str | None = None
    ) -> JobError:
        return JobError(f"{self.where(table, index, key)}: {message}")


def _check_sections(data: dict[str, Any], err: _Errors) -> None:
    """Only known sections, and only known keys in ``[job]``."""
    allowed_top = {"job", "vars", *_TABLES}
    for key in data:
        if key not in allowed_top:
            raise err(_unknown(f"section [{key}]", key, sorted(allowed_top), "Sections", "[{}]".format), key)
    for key in data.get("job", {}):
        if key not in _JOB_KEYS:
            raise err(f"unknown key {key!r} in [job]; keys are {', '.join(sorted(_JOB_KEYS))}", "job", None, key)


def _build_table(data: dict[str, Any], table: str, cls: type, variables: dict[str, str], err: _Errors) -> tuple:
    """The ``[[table]]`` rows as ``cls`` specs, each checked; names unique within the table."""
    rows = data.get(table, [])
    if isinstance(rows, dict):
        raise err(f"[{table}] must be an array of tables: write [[{table}]]", table)
    own = {f.name for f in dataclasses.fields(cls)} - {"settings"}
    config_keys = _config_keys(table)
    fields = sorted(own | config_keys, key=lambda k: (k != "name", k))
    specs, names = [], set()
    for i, row in enumerate(rows):
        row = _substitute(row, variables, err.where(table, i))
        for key in row:
            if key not in fields:
                raise err(_unknown(f"key {key!r} in [[{table}]]", key, fields, "Keys"), table, i, key)
        name = _check_name(row, names, table, i, err)
        names.add(name)
        try:
            spec = cls(**_spec_kwargs(row, own, bool(config_keys)))
            _check_spec(spec)
        except (TypeError, ValueError) as exc:
            raise err(str(exc), table, i, _key_in_message(row, str(exc))) from None
        specs.append(spec)
    return tuple(specs)


def _check_name(row: dict[str, Any], taken: set[str], table: str, index: int, err: _Errors) -> str:
    if "name" not in row:
        raise err(f"[[{table}]] number {index + 1} needs a name", table, index)
    name = row["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise err(f"name {name!r}: use letters, digits, '_', '-' and '.'", table, index, "name")
    if name in taken:
        raise err(f"name {name!r} is used twice in [[{table}]]", table, index, "name")
    return name


def _spec_kwargs(row: dict[str, Any], own: set[str], has_settings: bool) -> dict[str, Any]:
    """A row as hashable keyword arguments: the spec's own fields, the rest gathered as ``settings``."""
    kwargs: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, list):
            value = tuple(value)
        if key == "params":
            value = tuple(sorted(value.items())) if isinstance(value, dict) else value
        (kwargs if key in own else settings)[key] = value
    if has_settings:
        kwargs["settings"] = tuple(sorted(settings.items()))
    return kwargs


def _check_references(tables: dict[str, tuple], err: _Errors) -> None:
    """Tables that must be there, and names that must resolve to another table's rows."""
    datasets, backbones, classifiers, finetunes = (tables[t] for t in _TABLES)
    if not datasets:
        raise err("a job needs at least one [[datasets]] table (name, source)")
    if classifiers and not backbones:
        raise err("classifiers need at least one [[backbones]] table to extract features with")
    backbone_names = {b.name for b in backbones}
    classifier_names = {c.name: c for c in classifiers}
    for i, c in enumerate(classifiers):
        for b in c.backbones or ():
            if b not in backbone_names:
                message = f"classifier {c.name!r} names backbone {b!r}, which is not a [[backbones]] name"
                raise err(message, "classifiers", i, "backbones")
    for i, f in enumerate(finetunes):
        if f.init_head is None:
            continue
        if f.backbone not in backbone_names:
            message = (
                f"init_head needs backbone to name a [[backbones]] table (its logreg is trained on that "
                f"table's features), not {f.backbone!r}"
            )
            raise err(message, "finetune", i, "backbone")
        target = classifier_names.get(f.init_head)
        if target is None or target.classifier != "logreg":
            message = f'init_head {f.init_head!r} must name a [[classifiers]] table with classifier = "logreg"'
            raise err(message, "finetune", i, "init_head")


def _job(
    path: Path, job_table: dict[str, Any], tables: dict[str, tuple], variables: dict[str, str], err: _Errors
) -> Job:
    name = job_table.get("name", path.stem)
    # Relative paths (out, sources) are relative to the working directory, like every featx command.
    out = Path(_substitute(job_table.get("out", f"runs/{name}"), variables, str(path))).expanduser()
    seed = job_table.get("seed", 0)
    if not isinstance(seed, int):
        raise err("seed must be an integer", "job", None, "seed")
    return Job(
        name=name,
        out=out,
        seed=seed,
        datasets=tables["datasets"],
        backbones=tables["backbones"],
        classifiers=tables["classifiers"],
        finetune=tables["finetune"],
        device=job_table.get("device", "auto"),
        workers=job_table.get("workers"),
        source_file=path,
    )


def _key_in_message(row: dict[str, Any], message: str) -> str | None:
    """The key an error message is about: its value quoted in the message, else its name mentioned."""
    for key, value in row.items():
        if key != "name" and isinstance(value, str | int | float) and len(str(value)) > 1 and repr(value) in message:
            return key
    return next((k for k in row if k != "name" and re.search(rf"\b{re.escape(k)}\b", message)), None)


def _check_spec(spec: Any) -> None:
    """Validate one table's values without loading any model, by the checks of the options' own modules."""
    from featx.backbones.names import parse_backbone_name
    from featx.classify.training import check_shots

    if isinstance(spec, DatasetSpec):
        s = spec.source
        if not (s == "digits" or s.startswith("torchvision:") or Path(s).expanduser().exists()):
            raise ValueError(f"source {s!r} does not exist (sources: a folder, archive, CSV, digits, torchvision:NAME)")
        check_test_fraction(spec.test_fraction)
    elif isinstance(spec, BackboneSpec):
        parse_backbone_name(spec.backbone)
        for option in ("pool", "dtype", "tta", "decode"):
            check_option(option, getattr(spec, option))
        if not spec.layers:
            raise ValueError("layers must name at least one layer")
        if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
            raise ValueError("batch_size must be a positive integer")
    elif isinstance(spec, ClassifierSpec):
        _classifier_config(spec, seed=0, layer=None).validate()
        if spec.shots is not None:
            check_shots(spec.shots)
    elif isinstance(spec, FinetuneSpec):
        _finetune_config(spec, seed=0)


def _classifier_config(spec: ClassifierSpec, seed: int, layer: str | None):
    from featx.classify.config import ClassifierConfig

    return ClassifierConfig(**dict(spec.settings), layer=layer, seed=seed)


def _finetune_config(spec: FinetuneSpec, seed: int):
    from featx.finetune.config import DEFAULT_PHASES, FinetuneConfig, parse_phases

    settings = dict(spec.settings)
    phases = tuple(parse_phases(settings.pop("phases", DEFAULT_PHASES)))
    return FinetuneConfig(phases=phases, **settings, seed=seed)
