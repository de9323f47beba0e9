"""Declarative option tables: each config's options, their constraints, defaults and help in one place.

A config is a frozen dataclass whose option fields are made by :func:`option`: the field's default, what values
it allows (:class:`Interval`, :class:`Choices`, :class:`Text`, :class:`Flag`, :class:`Items`, ``None``), its help
and where it appears (the command line, pipeline files). :func:`check_options` checks every field of a config
against its table once, when the config is built, with one wording for every option; the CLI (its click
options) and the pipelines (their keys and types) are generated from the same table by :func:`options_of`, so
no caller re-checks an option. Modelled on scikit-learn's ``_parameter_constraints`` and
``validate_parameter_constraints``: a list of allowed forms per option, the value valid when one of them allows
it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from featx.exceptions import InvalidOptionError, close_matches, unknown

__all__ = [
    "Choices",
    "Flag",
    "Interval",
    "Items",
    "Option",
    "Text",
    "check_options",
    "check_value",
    "config_from",
    "option",
    "options_of",
    "parse_text",
]

#: The largest integer an int32 index holds; bounds batch sizes (a bigger one is no batch any device can run).
INT32_MAX = 2**31 - 1
#: Seeds scikit-learn and NumPy accept (``random_state`` is a 32-bit unsigned integer).
SEED_MAX = 2**32 - 1


class Constraint:
    """One form a value may take; ``allows`` tests a value, ``words`` describes the form, ``from_text`` parses
    a command-line string into it (raising ``ValueError`` when the text is not of this form)."""

    def allows(self, value: Any) -> bool:
        raise NotImplementedError

    def words(self) -> str:
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        raise NotImplementedError


def _num(x: float) -> str:
    """A bound as people write it: ``0``, ``1``, ``4294967295``, ``0.5``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Interval(Constraint):
    """A finite integer (``integer=True``) or real number between ``low`` and ``high`` (``None``: unbounded).

    ``closed`` is ``both``, ``left``, ``right`` or ``neither``: which bounds belong to the interval. NaN and
    infinities are never allowed.
    """

    integer: bool
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed in ("right", "neither"))):
            return False
        return not (
            self.high is not None and (value > self.high or (value == self.high and self.closed in ("left", "neither")))
        )

    def words(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'greater than' if self.closed in ('right', 'neither') else 'of at least'} {_num(self.low)}"
        if self.low is None:
            return f"{kind} {'less than' if self.closed in ('left', 'neither') else 'of at most'} {_num(self.high)}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"

    def from_text(self, text: str) -> Any:
        return int(text) if self.integer else float(text)


@dataclass(frozen=True)
class Choices(Constraint):
    """One of a fixed set of strings."""

    values: tuple[str, ...]

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def words(self) -> str:
        return self.values[0] if len(self.values) == 1 else f"one of {', '.join(self.values)}"

    def from_text(self, text: str) -> Any:
        if text not in self.values:
            raise ValueError(text)
        return text


@dataclass(frozen=True)
class Text(Constraint):
    """A non-empty string: ``what`` it names and an ``example`` for messages."""

    example: str = ""
    what: str = "a non-empty string"

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value)

    def words(self) -> str:
        return f"{self.what}{f' (e.g. {self.example})' if self.example else ''}"

    def from_text(self, text: str) -> Any:
        if not text:
            raise ValueError(text)
        return text


@dataclass(frozen=True)
class Flag(Constraint):
    """``True`` or ``False``."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, bool)

    def words(self) -> str:
        return "true or false"

    def from_text(self, text: str) -> Any:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)


@dataclass(frozen=True)
class Items(Constraint):
    """A list of items each allowed by ``item``, ``low`` to ``high`` long, optionally all different; written
    comma-separated on the command line (``0.1,1,10``)."""

    item: Constraint
    low: int = 0
    high: int | None = None
    distinct: bool = False
    example: str = ""

    def allows(self, value: Any) -> bool:
        if not isinstance(value, tuple | list):
            return False
        if len(value) < self.low or (self.high is not None and len(value) > self.high):
            return False
        if self.distinct and len(set(value)) != len(value):
            return False
        return all(self.item.allows(v) for v in value)

    def words(self) -> str:
        parts = ["a list of"]
        if self.low == self.high:
            parts.append(f"exactly {self.low}")
        elif self.low:
            parts.append(f"{self.low} or more")
        if self.distinct:
            parts.append("distinct")
        example = f", e.g. {self.example}" if self.example else ""
        return f"{' '.join(parts)} items, each {self.item.words()}{example}"

    def from_text(self, text: str) -> Any:
        return tuple(self.item.from_text(part.strip()) for part in text.split(",") if part.strip())


class _NoneConstraint(Constraint):
    def allows(self, value: Any) -> bool:
        return value is None

    def words(self) -> str:
        return "unset"

    def from_text(self, text: str) -> Any:
        raise ValueError(text)


@dataclass(frozen=True)
class Option:
    """One option of a config's table.

    Parameters
    ----------
    allowed : tuple of Constraint
        The forms the value may take (``None`` among them allows leaving it unset); valid when one allows it.
    help : str
        One sentence for ``--help`` and the docs.
    flags : tuple of str
        The command-line flags; by default ``--NAME`` with dashes. Empty: the command line sets it otherwise.
    pipeline : bool
        Whether a pipeline table may set it (the pipeline sets the others itself: a layer, the job's seed).
    show_default : bool or str
        What ``--help`` says of the default.
    label : str, optional
        How messages name it, where not by its name (``fingerprint mode``).
    """

    allowed: tuple[Constraint, ...]
    help: str
    flags: tuple[str, ...] | None = None
    pipeline: bool = True
    show_default: bool | str = True
    label: str | None = None

    def words(self) -> str:
        """The allowed forms in words: ``an integer of at least 1 (or unset)``."""
        forms = " or ".join(c.words() for c in self.allowed if not isinstance(c, _NoneConstraint))
        return forms + (" (or unset)" if any(isinstance(c, _NoneConstraint) for c in self.allowed) else "")


def option(
    default: Any,
    *allowed: Constraint | None,
    help: str,
    flags: tuple[str, ...] | None = None,
    pipeline: bool = True,
    show_default: bool | str = True,
    label: str | None = None,
) -> Any:
    """A dataclass field that is an option of its config's table (``None`` in ``allowed``: may be left unset)."""
    forms = tuple(_NoneConstraint() if c is None else c for c in allowed)
    meta = Option(forms, help, flags, pipeline, show_default, label)
    if isinstance(default, list | dict | set):
        raise TypeError("an option's default must be immutable (a tuple, not a list)")
    return dataclasses.field(default=default, metadata={"featx.option": meta})


def options_of(config: type | Any) -> dict[str, tuple[Option, Any]]:
    """The table of a config class (or instance): ``{name: (Option, default)}`` in field order."""
    table = {}
    for f in dataclasses.fields(config):
        meta = f.metadata.get("featx.option")
        if meta is not None:
            default = f.default if f.default is not dataclasses.MISSING else None
            table[f.name] = (meta, default)
    return table


def check_value(name: str, value: Any, spec: Option) -> Any:
    """``value`` if ``spec`` allows it, else :class:`~featx.exceptions.InvalidOptionError` naming the option,
    the value and what it must be (an unknown choice: :class:`~featx.exceptions.UnknownOptionError`, with the
    close matches)."""
    if any(c.allows(value) for c in spec.allowed):
        return value
    choices = [v for c in spec.allowed if isinstance(c, Choices) for v in c.values]
    if choices and isinstance(value, str) and all(isinstance(c, Choices | _NoneConstraint) for c in spec.allowed):
        raise unknown(spec.label or name, value, choices, f"Choose one of {', '.join(choices)}.", key=name)
    shown = list(value) if isinstance(value, tuple) else value  # as a pipeline file or Python code wrote it
    raise InvalidOptionError(name, f"{name} must be {spec.words()}; got {shown!r}")


def check_options(config: Any) -> None:
    """Check every option field of a frozen dataclass instance against its table (in ``__post_init__``).

    Lists become tuples first (a pipeline file gives lists), so a config equals itself however it was made.
    """
    for name, (spec, _) in options_of(config).items():
        value = getattr(config, name)
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, name, value)  # frozen: normalising is construction
        check_value(name, value, spec)


Config = TypeVar("Config")


def config_from(
    config: type[Config], base: Config | None, values: Mapping[str, Any], function: Callable[..., Any]
) -> Config:
    """The config a function that takes one was given: ``base`` (by default the table's defaults) with the
    options passed to ``function`` as keyword arguments (``values``) replacing its own, all checked by the table.

    So ``extract(src, pool="max")`` is ``extract(src, options=ExtractionOptions(pool="max"))`` and
    ``extract(src, options=opts, pool="max")`` changes one option of ``opts`` (timm's ``create_model(...,
    **kwargs)`` and ``pretrained_cfg_overlay`` habit); the names are the table's, never re-typed by the function.

    Parameters
    ----------
    config : type
        The config class (a frozen dataclass with an option table).
    base : config or None
        The config passed to ``function``, if any.
    values : mapping
        ``function``'s other keyword arguments.
    function : callable
        The function called, for its name and its own parameters in messages.

    Raises
    ------
    TypeError
        ``base`` is not a ``config``, or a keyword is neither an option of the table nor a parameter of
        ``function``: worded as Python's own error, with the close matches among both.
    InvalidOptionError
        From the table's check of a value (the one wording of every option).
    """
    table = options_of(config)
    extra = [name for name in values if name not in table]
    if extra:
        own = [
            name
            for name, p in inspect.signature(function).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        matches = close_matches(extra[0], [*own, *table])
        raise TypeError(
            f"{function.__name__}() got an unexpected keyword argument {extra[0]!r}."
            + (f" Did you mean: {', '.join(matches)}?" if matches else "")
            + f" Its options are those of {config.__name__}: {', '.join(table)}."
        )
    if base is None:
        return config(**values)
    if not isinstance(base, config):
        raise TypeError(
            f"{function.__name__}() takes its options as one {config.__name__} (or each as a keyword argument, "
            f"e.g. {next(iter(table))}=...), not a {type(base).__name__}"
        )
    return dataclasses.replace(base, **values) if values else base


def parse_text(name: str, text: str, spec: Option) -> Any:
    """A command-line string as the value of option ``name``: the first allowed form it parses into and
    that allows it; :class:`~featx.exceptions.InvalidOptionError` otherwise."""
    reason = ""
    for form in spec.allowed:
        try:
            value = form.from_text(text)
        except (ValueError, TypeError, OverflowError) as exc:
            if getattr(form, "explains", False):  # its parser says what is wrong better than the words can
                reason = f" ({exc})"
            continue
        if form.allows(value):
            return value
    raise InvalidOptionError(name, f"{name} must be {spec.words()}; got {text!r}{reason}")
