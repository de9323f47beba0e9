"""Every public featx error, and the helpers that word them.

Every exception subclasses a built-in so callers can catch the familiar type (``except ValueError`` still
works); the message names the bad value, the valid choices and the fix. The modules that raise them import
them from here, so ``featx.exceptions.X`` is the class they raise (and ``featx.X`` the same class).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ArchiveError",
    "DamagedFileError",
    "DiskFullError",
    "ImageDecodeError",
    "IncompleteStoreError",
    "InsufficientMemoryError",
    "InvalidOptionError",
    "JobError",
    "NotResultsError",
    "NotWritableError",
    "ResultsError",
    "SpecMismatchError",
    "StoreError",
    "StoreLockedError",
    "UnknownNameError",
    "UnknownOptionError",
    "close_matches",
    "unknown",
]


class UnknownNameError(ValueError):
    """A backbone, tag, layer, source or option value that does not exist."""


class SpecMismatchError(ValueError):
    """An existing store (or model) was made with a different extraction spec."""


class StoreLockedError(RuntimeError):
    """Another process is writing the same feature store."""


class IncompleteStoreError(RuntimeError):
    """A store whose extraction has not finished (interrupted, or still running)."""


class DamagedFileError(ValueError):
    """A file featx wrote that cannot be read back: truncated, not the format it should be, or edited by hand.

    The message names the file, what is wrong with it and how to get a good one back.
    """


class StoreError(DamagedFileError):
    """A feature store that is not consistent with itself (a dataset missing or of the wrong length, a split
    code or a label that means nothing, a spec that does not parse); the message names the file and the fault."""


class NotWritableError(OSError):
    """An output folder that cannot be created or written (a read-only mount, no permission, under ``/proc``);
    the message names it, says why and what to do."""


class DiskFullError(OSError):
    """A disk too full for what featx must write (``errno`` is ``ENOSPC``); the message names the path, the space
    needed and what is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


class ImageDecodeError(ValueError):
    """One image could not be turned into pixels; the message is the reason recorded in the store."""


class ArchiveError(ValueError):
    """An archive that is broken, unsafe, or over a limit; the message names the file and the fix."""


class ResultsError(ValueError):
    """A results file that cannot be read: not JSON, a newer schema, or a missing section (the message says which)."""


class NotResultsError(ResultsError):
    """A JSON file that is not a featx results document at all (no featx ``schema`` field)."""


class InvalidOptionError(ValueError):
    """An option of a config (extraction, classifier, fine-tuning, split plan) with a value it does not allow;
    ``key`` is the option's name, the message says what it must be."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class UnknownOptionError(UnknownNameError, InvalidOptionError):
    """An option's value that is not one of its choices (or a parameter name an estimator does not have); the
    message lists the close matches."""

    def __init__(self, key: str, message: str) -> None:
        ValueError.__init__(self, message)
        self.key = key


class InsufficientMemoryError(MemoryError):
    """A fit whose estimated peak memory exceeds what the machine has; refused before it starts, with the
    estimate, the memory available and the alternatives."""


class JobError(ValueError):
    """A pipeline file that does not validate; the message names the file, line and fix."""


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` choices that look like ``name``: closest spellings, then prefixes, then substrings.

    Parameters
    ----------
    name : str
        What was typed.
    choices : iterable of str
        The valid names.
    n : int, default=5
        At most this many matches.

    Returns
    -------
    list of str
        Matches, best first, each once, in the spelling of ``choices``.

    Examples
    --------
    >>> close_matches("resnet5", ["resnet18", "resnet50", "vgg16"])
    ['resnet50', 'resnet18']
    """
    choices = list(choices)
    lowered: dict[str, str] = {}
    for c in choices:
        lowered.setdefault(c.lower(), c)
    needle = name.lower()
    hits: list[str] = []
    for candidate in (
        *(lowered[f] for f in difflib.get_close_matches(needle, list(lowered), n=n, cutoff=0.6)),
        *(c for c in choices if needle and c.lower().startswith(needle)),
        *(c for c in choices if needle and needle in c.lower()),
    ):
        if candidate not in hits:
            hits.append(candidate)
    return hits[:n]


def unknown(kind: str, name: str, choices: Iterable[str], hint: str, key: str | None = None) -> UnknownNameError:
    """Build an :class:`UnknownNameError` listing close matches and how to see every choice.

    Parameters
    ----------
    kind : str
        What ``name`` names (``pool``, ``backbone``, ``layer``, ...).
    name : str
        The unknown value.
    choices : iterable of str
        The valid values, searched for close matches.
    hint : str
        The last sentence: the choices themselves, or how to list them.
    key : str, optional
        The option the value was given for: the error is then an :class:`UnknownOptionError` carrying it.

    Returns
    -------
    UnknownNameError
        ``unknown KIND 'NAME'. Did you mean: A, B? HINT`` (no "Did you mean" when nothing is close); raise it.
    """
    matches = close_matches(name, choices)
    msg = f"unknown {kind} {name!r}."
    if matches:
        msg += " Did you mean: " + ", ".join(matches) + "?"
    return UnknownNameError(f"{msg} {hint}") if key is None else UnknownOptionError(key, f"{msg} {hint}")
