"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from featx.exceptions import NotWritableError

__all__ = ["atomic_path", "atomic_write", "check_writable", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, temp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``target`` at; after the block it is fsynced and renamed into place.

    For writers that want a path, not a file object (HDF5). On leaving the block normally, the temporary
    file is flushed to disk, renamed over ``target`` (atomically: a reader sees the old file or the new one)
    and the folder entry flushed too; on an error (Ctrl-C included) it is removed and ``target`` is untouched.

    Parameters
    ----------
    target : str or Path
        The file to produce.
    temp : str or Path, optional
        The temporary path, on the same filesystem as ``target``; by default ``.NAME.tmp-PID`` beside it,
        so two processes writing the same target never collide.

    Examples
    --------
    >>> with atomic_path("store.h5") as tmp:  # doctest: +SKIP
    ...     with h5py.File(tmp, "w") as f:
    ...         f["x"] = data
    """
    target = Path(target)
    tmp = Path(temp) if temp is not None else target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``target``, fsync it, then rename it into place.

    The temporary name carries the process id, so two processes writing the same target never collide.
    """
    target = Path(target)
    with atomic_path(target) as tmp, tmp.open("wb") as fh:
        write(fh)
    return target


def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, before any work that would be lost.

    Parameters
    ----------
    folder : str or Path
    what : str
        What the folder is to the user (``--out``, ``out``), for the message.

    Raises
    ------
    NotWritableError
        ``folder`` cannot be created, or written into (a read-only mount, no permission, a file in the way).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".featx-write-check-"):
            pass
    except OSError as exc:
        raise NotWritableError(
            f"{what} {str(folder)!r} cannot be created or written ({exc.strerror or exc}): choose a folder you can "
            "write to"
        ) from None
    return folder
