"""Finding a complete store by its cache key wherever it was written, and reusing it at another path.

A store is a function of its key (the images and the spec), so a second job that asks for the same key at
another path (``featx run`` with another ``out``, ``featx extract --out``) needs no extraction: the file is
linked (a hard link, or a copy across file systems) into place. Every complete store featx writes or finds
is recorded in ``<cache>/stores/by-key/<key>`` (its absolute path); a record is trusted only when the file
it names still holds that key. Stores in ``<cache>/stores`` named by their key are found without a record.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from featx._runtime.env import cache_dir
from featx._runtime.io import atomic_path, atomic_write
from featx.store.format import read_key

__all__ = ["find_store", "link_store", "remember_store"]

log = logging.getLogger(__name__)


def _record(key: str) -> Path:
    return cache_dir() / "stores" / "by-key" / key


def remember_store(path: str | Path, key: str) -> None:
    """Record that the complete store at ``path`` holds ``key`` (best effort: a read-only cache is no error)."""
    target = str(Path(path).expanduser().resolve())
    record = _record(key)
    try:
        if record.is_file() and record.read_text().strip() == target:
            return
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record, lambda fh: fh.write(target.encode("utf-8")))
    except OSError as exc:
        log.debug("could not record store %s under its key (%s)", target, exc)


def find_store(key: str, *, besides: str | Path | None = None) -> Path | None:
    """A complete store holding ``key`` other than ``besides``, or ``None``.

    Looks at the recorded path of the key, then at ``<cache>/stores/<key prefix>.h5``; a file that no longer
    holds the key (deleted, replaced, unfinished) is passed over.
    """
    own = Path(besides).expanduser().resolve() if besides is not None else None
    candidates = []
    record = _record(key)
    try:
        if record.is_file():
            candidates.append(Path(record.read_text().strip()))
    except OSError:
        pass
    candidates.append(cache_dir() / "stores" / f"{key[:20]}.h5")
    for candidate in candidates:
        if candidate.is_file() and candidate.resolve() != own and read_key(candidate) == key:
            return candidate
    return None


def link_store(found: str | Path, path: str | Path) -> str:
    """Put the store ``found`` at ``path`` (which must not exist yet): a hard link, else a copy.

    A hard link shares the file; :func:`featx.store.writer.update_labels` copies a shared file before
    changing its labels, so relabelling one path never changes the other. Returns ``"linked"`` or ``"copied"``.
    """
    found, path = Path(found), Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            os.link(found, tmp)
            how = "linked"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(found, tmp)
            how = "copied"
    return how
