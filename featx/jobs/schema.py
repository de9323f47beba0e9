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
    margin = 1                  # the decision's margin of practical equivalence, in points of accuracy

    [vars]                      # ${data} below; override with `featx run JOB --set data=/elsewhere`
    data = "../shared/data"

    [[datasets]]
    name = "digits"
    source = "digits"
    repeats = 1                 # split seeds: 3 or more let the decision count split-to-split variance

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

from featx.data.splits import DEFAULT_SPLIT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, SplitPlan
from featx.exceptions import JobError
from featx.jobs.decision import DEFAULT_MARGIN
from featx.jobs.values import (
    CELL_SEPARATOR,
    BadValue,
    check_classifier_references,
    check_finetune_references,
    check_row,
)
from featx.spec import DEFAULT_BACKBONE, DEFAULT_DECODE, DEFAULT_DTYPE, DEFAULT_POOL, DEFAULT_TTA

__all__ = [
    "BackboneSpec",
    "ClassifierSpec",
    "DatasetSpec",
    "FinetuneSpec",
    "Job",
    "JobError",
    "job_error",
    "load_job",
]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---------------------------------------------------------------------------------------------- schema
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
    split_seed: int = DEFAULT_SPLIT_SEED
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    repeats: int = 1

    @property
    def plan(self) -> SplitPlan:
        """The dataset's first :class:`~featx.data.splits.SplitPlan` (split seed ``split_seed``)."""
        return self.plan_of(self.split_seed)

    @property
    def split_seeds(self) -> tuple[int, ...]:
        """The split seeds of the dataset's ``repeats``."""
        return tuple(range(self.split_seed, self.split_seed + self.repeats))

    def plan_of(self, split_seed: int) -> SplitPlan:
        """The plan of one repeat."""
        return SplitPlan(split_seed=split_seed, val_fraction=self.val_fraction, test_fraction=self.test_fraction)


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
    seeds: tuple[int, ...] | None = None  # training seeds, one cell each (None: the job's seed)
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
    seeds: tuple[int, ...] | None = None  # training seeds, one cell each (None: the job's seed)
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
    margin: float = DEFAULT_MARGIN  # the decision's margin of practical equivalence, a fraction (0.01 = 1 pt)


_TABLES = {"datasets": DatasetSpec, "backbones": BackboneSpec, "classifiers": ClassifierSpec, "finetune": FinetuneSpec}


_JOB_KEYS = {"name", "out", "seed", "device", "workers", "margin"}


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

    Nothing is loaded: types, option values, sources, names and backbone names (resolved without their
    weights) are checked here. A layer name needs the network itself, so :func:`~featx.jobs.runner.run` checks
    layers at its start, before any extraction, still naming the line.

    Parameters
    ----------
    path : str or Path
    overrides : dict, optional
        ``[vars]`` values set on the command line (``--set NAME=VALUE``).

    Raises
    ------
    JobError
        Unknown keys, values of the wrong type or out of range, missing sources, unknown backbones, names that
        repeat, do not resolve or contain ``__`` (the separator of a cell's folder name).
    """
    path = Path(path)
    text, data = _read_toml(path)
    err = _Errors(path, text)
    _check_sections(data, err)
    variables = _variables(data.get("vars", {}), overrides or {}, err)
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


def job_error(
    job: Job, message: str, table: str | None = None, index: int | None = None, key: str | None = None
) -> JobError:
    """A :class:`JobError` about a loaded job, starting with ``FILE:LINE`` of the table or key it is about.

    Parameters
    ----------
    job : Job
    message : str
        What is wrong and how to fix it.
    table, index, key : optional
        The ``index``-th ``[[table]]`` (or ``[table]``) and its ``key``; the line falls back to the table's, then
        to the file alone (``job NAME`` when the job was not read from a file).

    Returns
    -------
    JobError
        Raise it.
    """
    path = job.source_file
    if path is None or not path.is_file():
        return JobError(f"job {job.name!r}: {message}")
    return _Errors(path, path.read_text(encoding="utf-8"))(message, table, index, key)


def _check_sections(data: dict[str, Any], err: _Errors) -> None:
    """Only known sections, tables where tables belong, and only known keys in ``[job]``."""
    allowed_top = {"job", "vars", *_TABLES}
    for key in data:
        if key not in allowed_top:
            raise err(_unknown(f"section [{key}]", key, sorted(allowed_top), "Sections", "[{}]".format), key)
    for key in ("job", "vars"):
        if not isinstance(data.get(key, {}), dict):
            message = f"[{key}] must be a table: write [{key}] and its keys on the lines below"
            raise err(message, key) if _locate(err.text, key, None, None) else err(message, None, None, key)
    for key in data.get("job", {}):
        if key not in _JOB_KEYS:
            raise err(f"unknown key {key!r} in [job]; keys are {', '.join(sorted(_JOB_KEYS))}", "job", None, key)


def _variables(table: dict[str, Any], overrides: dict[str, str], err: _Errors) -> dict[str, str]:
    """``[vars]`` with ``--set`` applied, each value expanded (a value may use other variables, not itself)."""
    raw: dict[str, str] = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise err(f"[vars] values are strings or numbers; {name} is {value!r}", "vars", None, name)
        raw[name] = str(value)
    raw.update(overrides)
    return {name: _expand(name, raw, err, ()) for name in raw}


def _expand(name: str, raw: dict[str, str], err: _Errors, chain: tuple[str, ...]) -> str:
    """A variable's value with the ``${…}`` it uses replaced, refusing a chain that comes back to itself."""
    if name in chain:
        loop = " → ".join(f"${{{n}}}" for n in (*chain[chain.index(name) :], name))
        raise err(
            f"variable {name!r} refers to itself ({loop}); give it a value that does not use ${{{name}}}, or "
            f"pass --set {name}=VALUE",
            "vars",
            None,
            chain[0],
        )

    def repl(m: re.Match) -> str:
        if m.group(1) not in raw:
            raise err(
                f"variable {name!r} uses unknown variable ${{{m.group(1)}}}; define it under [vars] or pass "
                f"--set {m.group(1)}=VALUE",
                "vars",
                None,
                name,
            )
        return _expand(m.group(1), raw, err, (*chain, name))

    return _VAR.sub(repl, raw[name])


def _build_table(data: dict[str, Any], table: str, cls: type, variables: dict[str, str], err: _Errors) -> tuple:
    """The ``[[table]]`` rows as ``cls`` specs, each checked; names unique within the table."""
    rows = data.get(table, [])
    if isinstance(rows, dict):
        raise err(f"[{table}] must be an array of tables: write [[{table}]]", table)
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise err(f"[[{table}]] must be tables: write [[{table}]] and its keys on the lines below", None, None, table)
    own = {f.name for f in dataclasses.fields(cls)} - {"settings"}
    config_keys = _config_keys(table)
    fields = sorted(own | config_keys, key=lambda k: (k != "name", k))
    specs, names = [], set()
    for i, raw in enumerate(rows):
        row = _substitute(raw, variables, err.where(table, i))
        for key in row:
            if key not in fields:
                raise err(_unknown(f"key {key!r} in [[{table}]]", key, fields, "Keys"), table, i, key)
        name = _check_name(row, names, table, i, err)
        names.add(name)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in row and _required(f)]
        if missing:
            raise err(f"[[{table}]] {name!r} needs {' and '.join(missing)}", table, i, "name")
        try:
            spec = cls(**_spec_kwargs(row, own, bool(config_keys)))
            check_row(table, spec)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            key = exc.key if isinstance(exc, BadValue) else _key_in_message(row, str(exc))
            raise err(str(exc) + _variables_hint(raw.get(key), variables), table, i, key) from None
        specs.append(spec)
    return tuple(specs)


def _variables_hint(raw: Any, variables: dict[str, str]) -> str:
    """For a bad value written with ``${NAME}``: what each variable was, and how to set it (``--set``)."""
    used = list(dict.fromkeys(_VAR.findall(raw))) if isinstance(raw, str) else []
    if not used:
        return ""
    values = ", ".join(f"${{{n}}} = {variables[n]!r}" for n in used if n in variables)
    relative = any(n in variables and not Path(variables[n]).expanduser().is_absolute() for n in used)
    where = f", read from the working folder {Path.cwd()}" if relative else ""
    return f"; {values}{where}: pass --set {used[0]}=/path/to/it to point it elsewhere"


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_name(row: dict[str, Any], taken: set[str], table: str, index: int, err: _Errors) -> str:
    if "name" not in row:
        raise err(f"[[{table}]] number {index + 1} needs a name", table, index)
    name = row["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise err(f"name {name!r}: use letters, digits, '_', '-' and '.'", table, index, "name")
    if CELL_SEPARATOR in name or name.endswith("_"):
        fixed = re.sub(r"_{2,}", "-", name).rstrip("_")
        raise err(f"name {name!r} {_SEPARATOR_RULE}; rename it, e.g. {fixed!r}", table, index, "name")
    if name in taken:
        raise err(f"name {name!r} is used twice in [[{table}]]", table, index, "name")
    return name


_SEPARATOR_RULE = (
    f"may not contain {CELL_SEPARATOR!r} or end with '_': a cell's folder joins its names with {CELL_SEPARATOR!r} "
    "(dataset__backbone__layer__classifier), so such names could give two cells one folder"
)


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
    for i, c in enumerate(classifiers):
        check_classifier_references(c, backbones, lambda message, key, i=i: err(message, "classifiers", i, key))
    for i, f in enumerate(finetunes):
        check_finetune_references(f, backbones, classifiers, lambda message, key, i=i: err(message, "finetune", i, key))


def _job(
    path: Path, job_table: dict[str, Any], tables: dict[str, tuple], variables: dict[str, str], err: _Errors
) -> Job:
    """The checked ``[job]`` settings with the tables: a :class:`Job`."""
    name = job_table.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise err(f"name must be a non-empty string, got {name!r}", "job", None, "name")
    seed = job_table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise err(f"seed must be an integer, got {seed!r}", "job", None, "seed")
    workers = job_table.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise err(f"workers must be 0 (decode in the main process) or more, got {workers!r}", "job", None, "workers")
    device = job_table.get("device", "auto")
    try:
        _check_device(device)
    except ValueError as exc:
        raise err(str(exc), "job", None, "device") from None
    margin = job_table.get("margin", 100 * DEFAULT_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 < margin < 100:
        raise err(
            f"margin is the decision's margin of practical equivalence in points of accuracy, a number between 0 "
            f"and 100 (1 = 1 pt); got {margin!r}",
            "job",
            None,
            "margin",
        )
    return Job(
        margin=margin / 100,
        name=name,
        out=_out_folder(job_table.get("out", f"runs/{name}"), variables, err),
        seed=seed,
        datasets=tables["datasets"],
        backbones=tables["backbones"],
        classifiers=tables["classifiers"],
        finetune=tables["finetune"],
        device=device,
        workers=workers,
        source_file=path,
    )


def _check_device(device: Any) -> None:
    from featx._runtime.device import resolve_device

    if not isinstance(device, str):
        raise ValueError(f"device must be a string (auto, cpu, cuda, cuda:N or mps), got {device!r}")
    resolve_device(device)


def _out_folder(value: Any, variables: dict[str, str], err: _Errors) -> Path:
    """``out`` as a path (relative to the working directory, like every featx command), refused if it is a file."""
    where = ("job", None, "out")
    if not isinstance(value, str) or not value.strip():
        raise err(f'out must be a folder path (a string), e.g. out = "runs/NAME"; got {value!r}', *where)
    out = Path(_substitute(value, variables, err.where(*where))).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is inside {str(existing)!r}, which is a file"
        raise err(f"out {str(out)!r} {what}: out must be a folder (it holds the stores, cells and reports)", *where)
    return out


def _key_in_message(row: dict[str, Any], message: str) -> str | None:
    """The key an error message is about: its value quoted in the message, else its name mentioned (as a word,
    else as the start of one: ``preprocess`` in "preprocessing step")."""
    for key, value in row.items():
        quoted = isinstance(value, str) or (isinstance(value, int | float) and len(str(value)) > 1)
        if key != "name" and quoted and repr(value) in message:
            return key
    for pattern in (r"\b{}\b", r"\b{}"):
        key = next((k for k in row if k != "name" and re.search(pattern.format(re.escape(k)), message)), None)
        if key is not None:
            return key
    return None
