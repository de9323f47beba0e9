"""What the commands share: exit codes, error reporting, option decorators and printing helpers."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from featx.data.splits import DEFAULT_SPLIT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, SplitPlan
from featx.spec import OPTIONS

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_TOO_MANY_FAILURES",
    "batch_size_option",
    "choice_option",
    "device_option",
    "fail",
    "interrupted",
    "max_failures_option",
    "name_values",
    "no_progress_option",
    "print_failures",
    "print_metrics",
    "refuse_too_many_failures",
    "reported",
    "split_plan_options",
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
    except (*LIBRARY_ERRORS, *also) as exc:
        fail(exc)


def choice_option(name: str, *flags: str, help: str | None = None) -> Decorator:
    """``--NAME`` with the choices and default of the extraction option ``name`` (:data:`featx.spec.OPTIONS`)."""
    option = OPTIONS[name]
    return click.option(
        *(flags or (f"--{name}",)),
        type=click.Choice(option.choices),
        default=option.default,
        show_default=True,
        help=help,
    )


def device_option(help: str | None = None) -> Decorator:
    """``--device``, ``auto`` by default."""
    return click.option("--device", default="auto", show_default=True, help=help)


def batch_size_option(default: int = 64, help: str | None = None) -> Decorator:
    """``--batch-size``, a positive integer."""
    return click.option("--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help)


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
    """``--split-seed``, ``--val-fraction`` and ``--test-fraction``, handed to the command as one ``plan``
    (a :class:`~featx.data.splits.SplitPlan`)."""
    fraction = click.FloatRange(0, 1, min_open=True, max_open=True)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def with_plan(*args: Any, split_seed: int, val_fraction: float, test_fraction: float, **kwargs: Any) -> Any:
            plan = SplitPlan(split_seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
            return command(*args, plan=plan, **kwargs)

        for option in reversed(
            (
                click.option(
                    "--split-seed",
                    type=click.IntRange(min=0),
                    default=DEFAULT_SPLIT_SEED,
                    show_default=True,
                    help="Seed of the carved splits (separate from the training seed): the same seed, the same images.",
                ),
                click.option(
                    "--val-fraction",
                    type=fraction,
                    default=DEFAULT_VAL_FRACTION,
                    show_default=True,
                    help="Share of each class of train carved off as val (where hyper-parameters are chosen) when "
                    "the source has no val split.",
                ),
                click.option(
                    "--test-fraction",
                    type=fraction,
                    default=DEFAULT_TEST_FRACTION,
                    show_default=True,
                    help="Share of each class carved off as test when the source has neither test nor val.",
                ),
            )
        ):
            with_plan = option(with_plan)
        return with_plan

    return decorate
