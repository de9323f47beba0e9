"""One writer at a time: an exclusive lock on a file that dies with the process that took it.

A POSIX record lock (``fcntl.lockf``, i.e. ``F_SETLK``) belongs to the process, not to the file
descriptor: forked children (DataLoader workers) do not inherit it, and the kernel drops it the moment
its owner dies, even by ``kill -9``. ``flock`` locks belong to the open file description instead, which
forked workers share, so a killed writer's lock lived on until its orphaned workers noticed and exited.

Record locks have one trap: closing *any* descriptor of the file in the owning process drops the lock.
So the lock file is opened once, by the lock, and a second lock on the same file inside one process is
refused by a process-local table before the kernel is asked (which would grant it to the same process).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["FileLock", "LockHeld", "processes_with_open"]

_held_here: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds
_table_lock = threading.Lock()
_stray_descriptors: list[int] = []  # never closed, see acquire()


def _key_of(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class LockHeld(RuntimeError):
    """The lock file is held by another live process, or by this one already; ``holder`` says by whom."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.holder = holder


class FileLock:
    """An exclusive, non-blocking lock on ``path`` (created if missing) that records its holder's pid.

    Parameters
    ----------
    path : Path
        The lock file. Its content is ``"pid N on HOST"`` while held, for the message a second writer sees.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`LockHeld` naming the live holder; never waits."""
        import fcntl  # POSIX only; featx's writers run on Linux and macOS

        with _table_lock:
            # Checked before opening: closing a second descriptor of a file we hold would drop our lock.
            if _key_of(self.path) in _held_here:
                raise LockHeld(self.path, f"this process (pid {os.getpid()})")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in _held_here:  # the file appeared between the check and the open: keep fd, drop nothing
                _stray_descriptors.append(fd)
                raise LockHeld(self.path, f"this process (pid {os.getpid()})")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EACCES or EAGAIN: another process holds it
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)  # this process holds no lock on the file, so closing drops nothing
                raise LockHeld(self.path, holder) from None
            _held_here.add(key)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._fd, self._key = fd, key

    def still_ours(self) -> bool:
        """False if the lock file was removed (and maybe recreated) after we took it."""
        if self._fd is None:
            return False
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Drop the lock (closing its only descriptor); a no-op when not held."""
        if self._fd is None:
            return
        with _table_lock:
            _held_here.discard(self._key)
            os.close(self._fd)
        self._fd = self._key = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def processes_with_open(path: str | Path) -> list[str]:
    """``pid N (COMMAND)`` of every other process that has ``path`` open, for a message; Linux only (``[]``
    elsewhere, or for processes this user may not inspect)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                st = os.stat(fd)  # follows the link to the open file
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    found.append(f"pid {entry.name} ({command[:80] or '?'})")
                    break
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
    return found
