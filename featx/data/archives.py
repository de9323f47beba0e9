"""Unpacking image archives (``.tar``, ``.tar.gz``, ``.tgz``, ``.zip``) safely and within bounds.

An archive is untrusted input. Members that would land outside the unpack folder (absolute paths, ``..``,
links) are refused; so are archives that would fill the disk: a 1.7 MB zip can hold a 1 GiB member. Before
anything is written, the members' total size, their count and the expansion ratio are checked against
:class:`ArchiveLimits`, and the free disk space against the total; while a zip is unpacked, the bytes
actually written are counted too, since its headers may lie. A broken or truncated archive is a clear error
naming the file, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from featx.exceptions import ArchiveError

__all__ = ["ARCHIVE_LIMIT_ENV", "ArchiveError", "ArchiveLimits", "unpack"]

ARCHIVE_LIMIT_ENV = {
    "max_bytes": "FEATX_ARCHIVE_MAX_BYTES",
    "max_members": "FEATX_ARCHIVE_MAX_MEMBERS",
    "max_ratio": "FEATX_ARCHIVE_MAX_RATIO",
}
_FREE_SPACE_MARGIN = 256 << 20  # leave this much free beyond the unpacked bytes
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what unpacking one archive may write.

    Parameters
    ----------
    max_bytes : int, default=32 GiB
        Total size of the unpacked members.
    max_members : int, default=2,000,000
        Number of members (files and folders).
    max_ratio : float, default=100
        Unpacked size over the archive's size. Photos barely compress (JPEG, PNG: about 1x), so a far
        larger ratio is a decompression bomb, not a dataset.

    Each can be raised with an environment variable (:data:`ARCHIVE_LIMIT_ENV`), e.g.
    ``FEATX_ARCHIVE_MAX_BYTES=200e9`` for an ImageNet-sized archive.
    """

    max_bytes: int = 32 << 30
    max_members: int = 2_000_000
    max_ratio: float = 100.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ArchiveLimits:
        """The defaults, with any of :data:`ARCHIVE_LIMIT_ENV` set in the environment applied."""
        environ = os.environ if environ is None else environ
        limits = cls()
        for field, var in ARCHIVE_LIMIT_ENV.items():
            raw = environ.get(var)
            if raw in (None, ""):
                continue
            try:
                value = float(raw)
            except ValueError:
                raise ArchiveError(f"{var}={raw!r} is not a number; unset it or give e.g. {var}=1e10") from None
            if value <= 0:
                raise ArchiveError(f"{var}={raw!r} must be positive")
            limits = replace(limits, **{field: value if field == "max_ratio" else int(value)})
        return limits

    def check(self, path: Path, total: int, members: int) -> None:
        """Refuse an archive whose declared contents exceed a limit, naming the limit and how to raise it."""
        packed = max(1, path.stat().st_size)
        over = [
            ("max_bytes", total > self.max_bytes, f"unpacks to {total:,} bytes, over the limit of {self.max_bytes:,}"),
            ("max_members", members > self.max_members, f"holds {members:,} members, over {self.max_members:,}"),
            (
                "max_ratio",
                total / packed > self.max_ratio,
                f"expands {total / packed:,.0f}x ({packed:,} bytes to {total:,}), over {self.max_ratio:g}x: "
                "a decompression bomb, not images",
            ),
        ]
        for field, exceeded, what in over:
            if exceeded:
                raise ArchiveError(
                    f"{path}: {what}; nothing was unpacked. If the archive is trusted, raise the limit with "
                    f"{ARCHIVE_LIMIT_ENV[field]}=N"
                )


def unpack(path: str | Path, folder: str | Path, limits: ArchiveLimits | None = None) -> None:
    """Unpack the archive at ``path`` into the existing empty ``folder``, within ``limits``.

    Raises
    ------
    ArchiveError
        The archive is broken or truncated, holds an unsafe member, exceeds a limit, or the disk has too
        little free space. ``folder`` may then hold a partial copy: the caller removes it.
    """
    path, folder = Path(path), Path(folder)
    limits = limits or ArchiveLimits.from_env()
    try:
        if path.name.lower().endswith(".zip"):
            _unpack_zip(path, folder, limits)
        else:
            _unpack_tar(path, folder, limits)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveError(
            f"{path}: not a readable archive, or truncated ({type(exc).__name__}: {exc}); check the file "
            "(re-download or re-create it)"
        ) from None
    except NotImplementedError as exc:  # e.g. a zip compression method Python cannot read
        raise ArchiveError(f"{path}: {exc}; re-pack it as .tar.gz or a plain zip") from None


def _check_space(path: Path, folder: Path, total: int) -> None:
    free = shutil.disk_usage(folder).free
    if total + _FREE_SPACE_MARGIN > free:
        raise ArchiveError(
            f"{path}: unpacking needs {total:,} bytes but {folder.parent} has {free:,} free; free some space "
            "or point FEATX_CACHE_DIR at a larger disk"
        )


def _unpack_zip(path: Path, folder: Path, limits: ArchiveLimits) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        limits.check(path, sum(i.file_size for i in infos), len(infos))
        _check_space(path, folder, sum(i.file_size for i in infos))
        root = folder.resolve()
        written = 0
        for info in infos:
            dest = (folder / info.filename).resolve()
            if not dest.is_relative_to(root):
                raise ArchiveError(f"{path}: member {info.filename!r} would be written outside the unpack folder")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Headers can understate a member's size: count what is really written.
            with zf.open(info) as src, dest.open("wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    written += len(chunk)
                    if written > limits.max_bytes:
                        raise ArchiveError(
                            f"{path}: unpacks to more than its headers declare and over the limit of "
                            f"{limits.max_bytes:,} bytes; nothing is kept. If the archive is trusted, raise the "
                            f"limit with {ARCHIVE_LIMIT_ENV['max_bytes']}=N"
                        )
                    out.write(chunk)


def _unpack_tar(path: Path, folder: Path, limits: ArchiveLimits) -> None:
    with tarfile.open(path) as tf:
        members = tf.getmembers()  # reads through a compressed stream once; tar sizes are exact
        total = sum(m.size for m in members if m.isfile())
        limits.check(path, total, len(members))
        _check_space(path, folder, total)
        root = folder.resolve()
        for member in members:
            # tarfile's "data" filter would strip an absolute path's leading "/" and unpack the member inside
            # the folder; such an archive was made to write elsewhere, so it is refused, as links and devices are.
            if PurePosixPath(member.name).is_absolute() or PureWindowsPath(member.name).anchor:
                raise ArchiveError(f"{path}: member {member.name!r} has an absolute path; not unpacked")
            dest = (folder / member.name).resolve()
            if not dest.is_relative_to(root) or member.issym() or member.islnk() or member.isdev():
                raise ArchiveError(f"{path}: member {member.name!r} is not a plain file inside the archive")
        if hasattr(tarfile, "data_filter"):  # and the filter besides, for what a name check cannot see
            try:
                tf.extractall(folder, members=members, filter="data")
            except tarfile.FilterError as exc:
                raise ArchiveError(f"{path}: unsafe or broken archive member ({exc}); not unpacked") from None
            return
        tf.extractall(folder, members=members)
