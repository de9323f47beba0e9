"""Exceptions and error-message helpers shared by every featx module.

Every exception subclasses a built-in so callers can catch the familiar type; the message names
the bad value, the valid choices and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ImageDecodeError",
    "IncompleteStoreError",
    "SpecMismatchError",
    "StoreLockedError",
    "UnknownNameError",
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


class ImageDecodeError(ValueError):
    """One image could not be turned into pixels; the message is the reason recorded in the store."""


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` choices that look like ``name``: closest spellings, then prefixes, then substrings."""
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


def unknown(kind: str, name: str, choices: Iterable[str], hint: str) -> UnknownNameError:
    """Build an :class:`UnknownNameError` listing close matches and how to see every choice."""
    matches = close_matches(name, choices)
    msg = f"unknown {kind} {name!r}."
    if matches:
        msg += " Did you mean: " + ", ".join(matches) + "?"
    return UnknownNameError(f"{msg} {hint}")
