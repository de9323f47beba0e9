"""What the commands share: exit codes, error reporting, option decorators and printing helpers."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from featx._runtime.params import Choices, Flag, Interval, Items, Option, Text, check_value, options_of, parse_text
from featx.data.splits import SplitPlan
from featx.exceptions import InvalidOptionError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_TOO_MANY_FAILURES",
    "TableValue",
    "build",
    "device_option",
    "fail",
    "interrupted",
    "max_failures_option",
    "name_values",
    "no_progress_option",
    "out_folder_option",
    "print_failures",
    "print_metrics",
    "refuse_too_many_failures",
    "reported",
    "split_plan_options",
    "table_option",
    "table_options",
    "trust_option",
]

EXIT_TOO_MANY_FAILURES = 3
EXIT_INTERRUPTED = 130

#: What a library call raises for bad input or a failed job: shown as ``error: ...`` with exit code 1. An
#: ``EOFError`` is a truncated file; left to click, it would print ``Aborted!`` as if Ctrl-C had been pressed.
LIBRARY_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, OSError, EOFError)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def fail(exc: BaseException) -> NoReturn:
    """Print a library error and exit 1."""
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


def interrupted(kept: str | None = None) -> NoReturn:
    """Say that Ctrl-C stopped the command (and what work was ``kept``), and exit 130."""
    if kept is None:
        click.secho("interrupted; run the same command again.", fg="yellow", err=True)
    else:
        click.secho(f"interrupted: {kept}; run the same command again to resume.", fg="yellow", err=True)
    sys.exit(EXIT_INTERRUPTED)


@contextmanager
def reported(kept: str | None = None, also: Sequence[type[BaseException]] = ()) -> Iterator[None]:
    """Run a library call: its errors exit 1 with their message; Ctrl-C exits 130 saying what was ``kept``.

    Without ``kept`` (a command with no partial work to keep), Ctrl-C exits 130 with the plain message.
    """
    try:
        yield
    except KeyboardInterrupt:
        interrupted(kept)
    except InvalidOptionError as exc:  # a malformed option found once it meets the others: a usage error, exit 2
        raise click.BadParameter(str(exc), param_hint=_hint(exc.key)) from None
    except (*LIBRARY_ERRORS, *also) as exc:
        fail(exc)


def device_option(help: str | None = "Where to run: auto (CUDA when present), cpu, cuda, cuda:N or mps.") -> Decorator:
    """``--device``, ``auto`` by default."""
    return click.option("--device", default="auto", show_default=True, help=help)


def out_folder_option(help: str) -> Decorator:
    """``--out``/``-o``: the folder a command writes its files into, handed over as ``out_dir``."""
    return click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True, help=help)


def trust_option(help: str) -> Decorator:
    """``--trust``: load files holding types that could run code."""
    return click.option("--trust", is_flag=True, help=help)


def no_progress_option(help: str | None = "Hide the progress bar.") -> Decorator:
    """``--no-progress``."""
    return click.option("--no-progress", is_flag=True, help=help)


def _parse_max_failures(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    from featx.extract.engine import MaxFailures

    try:
        return MaxFailures.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def max_failures_option(help: str) -> Decorator:
    """``--max-failures``: a count, a percentage or ``inf``, parsed into a ``MaxFailures``."""
    return click.option("--max-failures", default="0", show_default=True, callback=_parse_max_failures, help=help)


def name_values(example: str, convert: Callable[[str], Any] | None = None) -> Callable[..., dict[str, Any]]:
    """A click callback turning repeated ``NAME=VALUE`` options into a dict (values passed through ``convert``)."""

    def parse(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> dict[str, Any]:
        out = {}
        for item in value:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r}: write NAME=VALUE, e.g. {example}")
            out[key] = raw if convert is None else convert(raw)
        return out

    return parse


def print_failures(failures: Sequence[Any], limit: int = 10) -> None:
    """The first ``limit`` failed images with their reasons, on stderr."""
    for failure in failures[:limit]:
        click.echo(f"  failed: {failure.id}: {failure.reason}", err=True)


def refuse_too_many_failures(n_failed: int, limit: Any) -> NoReturn:
    """Say that more images failed than ``--max-failures`` allows, and exit 3."""
    click.secho(
        f"{n_failed} images failed, more than --max-failures {limit} allows "
        "(the store is complete; its failures list says why each failed)",
        fg="red",
        err=True,
    )
    sys.exit(EXIT_TOO_MANY_FAILURES)


def print_metrics(test: dict[str, Any]) -> None:
    """One line of test metrics: accuracy with its 95% CI, balanced accuracy, macro F1, top-5."""
    lo, hi = test["accuracy_ci95"]
    top5 = f", top-5 {test['top5_accuracy']:.4f}" if test.get("top5_accuracy") is not None else ""
    click.echo(
        f"{test.get('split', 'test')} ({test['n']} images): accuracy {test['accuracy']:.4f} "
        f"[95% CI {lo:.4f}–{hi:.4f}], balanced {test['balanced_accuracy']:.4f}, "
        f"macro F1 {test['macro_f1']:.4f}{top5}"
    )


def split_plan_options() -> Decorator:
    """The options of :class:`~featx.data.splits.SplitPlan`'s table (``--split-seed``, ``--val-fraction``,
    ``--test-fraction``), handed to the command as one ``plan``."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def with_plan(*args: Any, **kwargs: Any) -> Any:
            return command(*args, plan=build(SplitPlan, kwargs), **kwargs)

        return table_options(SplitPlan)(with_plan)

    return decorate


# ------------------------------------------------------------------------------- options from the tables
class TableValue(click.ParamType):
    """A click type that parses and checks a value by its option's row of a config table: the error is the
    table's, and click exits 2 with it."""

    def __init__(self, option: str, spec: Option) -> None:
        self.option, self.spec = option, spec
        self.name = "|".join(_metavar(c) for c in spec.allowed if c.words() != "unset")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            if isinstance(value, str):
                return parse_text(self.option, value, self.spec)
            return check_value(self.option, value, self.spec)
        except InvalidOptionError as exc:
            self.fail(str(exc), param, ctx)


def _metavar(form: Any) -> str:
    if getattr(form, "metavar", None):
        return form.metavar
    if isinstance(form, Choices):
        return "|".join(form.values)
    if isinstance(form, Interval):
        return "INTEGER" if form.integer else "FLOAT"
    if isinstance(form, Items):
        return f"{_metavar(form.item)},…"
    return "TEXT" if isinstance(form, Text) else "VALUE"


def table_option(config: type, name: str, *flags: str, **overrides: Any) -> Decorator:
    """The click option of field ``name`` of a config's table: flags, type, choices, default and help from
    the table (``flags`` and ``overrides`` replace what a command shows differently, e.g. another default)."""
    spec, default = options_of(config)[name]
    decls = [*(flags or spec.flags or (f"--{name.replace('_', '-')}",))]
    if not any(d.isidentifier() for d in decls):
        decls.append(name)  # the command receives it under the config's own name
    kwargs: dict[str, Any] = {"default": default, "help": spec.help, "show_default": spec.show_default}
    if isinstance(spec.show_default, str):  # the default as it is typed (a phase string, MIN,MAX)
        kwargs.update(default=spec.show_default, show_default=True)
    forms = [c for c in spec.allowed if c.words() != "unset"]
    if [type(c) for c in forms] == [Flag]:
        if default:
            decls = [f"{decls[0]}/--no-{decls[0][2:]}", *decls[1:]]
        else:
            kwargs.update(is_flag=True, show_default=False)
    elif [type(c) for c in forms] == [Choices]:
        kwargs["type"] = click.Choice(forms[0].values)
    else:
        kwargs["type"] = TableValue(name, spec)
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def table_options(config: type, exclude: Sequence[str] = ()) -> Decorator:
    """Every command-line option of a config's table (those whose flags the table leaves empty are the
    command's own to write), in the table's order."""
    rows = [n for n, (spec, _) in options_of(config).items() if spec.flags != () and n not in exclude]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(rows):
            command = table_option(config, name)(command)
        return command

    return decorate


def build(config: type, kwargs: dict[str, Any], **extra: Any) -> Any:
    """``config`` built from the entries of ``kwargs`` that are its table's options (removed from ``kwargs``)
    and ``extra``; what the config refuses as a whole (one option against another) exits 2 like a bad option."""
    values = {name: kwargs.pop(name) for name in options_of(config) if name in kwargs}
    try:
        return config(**values, **extra)
    except InvalidOptionError as exc:
        raise click.BadParameter(str(exc), param_hint=_hint(exc.key)) from None


def _hint(key: str) -> str | None:
    """The flag an option's error names, where the command line has one under the option's name."""
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else ():
        if param.name == key and isinstance(param, click.Option):
            return f"'{param.opts[0]}'"
    return None
