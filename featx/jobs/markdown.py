"""Escaping for Markdown: a user's string (a store, folder, method or dataset name) stays text in ``report.md``.

Names come from file and folder names and pipeline files, so they may hold anything Markdown reads as syntax:
``<img onerror=…>`` (raw HTML, which renderers pass through), a backtick (which closes a code span early), a
``|`` (which splits a table row), ``*``, ``[…](…)``, a newline. Each helper returns Markdown that renders
as the string itself, whatever it holds (CommonMark and GitHub tables).
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = ["md_cell", "md_code", "md_link", "md_text"]

# Inline syntax (emphasis, code, links, images, raw HTML, entities, strikethrough, table pipes) and a heading's
# closing hashes. Escaping any ASCII punctuation with a backslash is valid CommonMark, so over-escaping is safe.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!$])")


def _one_line(value: object) -> str:
    """``value`` as text on one line: a line break would end a heading, a list item or a table row."""
    return re.sub(r"[\r\n\u2028\u2029]+", " ", str(value))


def md_text(value: object) -> str:
    """``value`` as Markdown text (a heading, a list item, a paragraph), rendered literally.

    Examples
    --------
    >>> md_text("x<img src=x onerror=alert(6)>.h5")
    'x\\\\<img src=x onerror=alert(6)\\\\>.h5'
    """
    return _SPECIAL.sub(r"\\\1", _one_line(value))


def md_cell(value: object) -> str:
    """``value`` as one cell of a Markdown table: :func:`md_text`, whose escaped ``|`` no longer splits the row."""
    return md_text(value)


def md_code(value: object) -> str:
    """``value`` as an inline code span, whatever backticks it holds.

    The fence is one backtick longer than the longest run inside, and padded with a space when the value starts
    or ends with a backtick, so nothing inside can close the span (CommonMark's rule for code spans). For prose
    and lists, not table cells (a ``|`` inside would split a row there: use :func:`md_cell`).

    Examples
    --------
    >>> md_code("runs/a`b")
    '``runs/a`b``'
    """
    text = _one_line(value)
    runs = re.findall(r"`+", text)
    fence = "`" * (max((len(r) for r in runs), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_link(path: str) -> str:
    """A relative path as a link destination: percent-encoded, so spaces, parentheses or ``<`` cannot end it."""
    return quote(path, safe="/")
