"""Reliability: a lock that dies with its writer, bounded and clean archive unpacking."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from featx._runtime.lock import FileLock, LockHeld
from featx.data.archives import ArchiveError, ArchiveLimits, unpack

# ------------------------------------------------------------------------------------------------ the lock

_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from featx._runtime.lock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    child = os.fork()
    if child == 0:  # a child that outlives its parent, as a DataLoader worker does for a while
        time.sleep(60)
        os._exit(0)
    print("locked", child, flush=True)
    time.sleep(60)
    """
)


@contextlib.contextmanager
def _holder(lock_path: Path) -> Iterator[subprocess.Popen]:
    """A process holding the lock, with a forked child holding its descriptors; both killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    try:
        yield proc
    finally:
        for pid in (proc.pid, int(child)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_a_live_holder_is_refused_with_its_pid(tmp_path):
    with _holder(tmp_path / "lock") as proc, pytest.raises(LockHeld, match=f"pid {proc.pid} on"):
        FileLock(tmp_path / "lock").acquire()


def test_the_lock_dies_with_its_holder_even_when_forked_children_live_on(tmp_path):
    with _holder(tmp_path / "lock") as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # No sleep: the forked child still has the file open, but a record lock is the dead parent's alone.
        with FileLock(tmp_path / "lock") as lock:
            assert lock.still_ours()


def test_one_process_cannot_take_its_own_lock_twice_and_keeps_the_first(tmp_path):
    first = FileLock(tmp_path / "lock")
    first.acquire()
    with pytest.raises(LockHeld, match="this process"):
        FileLock(tmp_path / "lock").acquire()
    # The refused attempt must not have dropped the first lock (closing a descriptor would): a child sees it held.
    probe = "from featx._runtime.lock import FileLock; import sys; FileLock(sys.argv[1]).acquire()"
    child = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "lock")], capture_output=True, text=True)
    assert child.returncode != 0 and f"pid {os.getpid()}" in child.stderr
    first.release()
    with FileLock(tmp_path / "lock"):
        pass


# ---------------------------------------------------------------------------------------------- archives


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [_zip, _tar_gz], ids=["zip", "tar.gz"])
def test_a_decompression_bomb_is_refused_before_anything_is_written(tmp_path, make):
    archive = make(tmp_path / ("bomb.zip" if make is _zip else "bomb.tar.gz"), {"a/zeros.png": bytes(20 << 20)})
    assert archive.stat().st_size < 200_000
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"bomb\.(zip|tar\.gz).*expands .*FEATX_ARCHIVE_MAX_RATIO"):
        unpack(archive, out)
    assert not any(out.rglob("*"))


def test_size_and_count_limits_name_the_variable_that_raises_them(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "many.zip", {f"c/{i}.png": os.urandom(1000) for i in range(20)})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"holds 20 members, over 10.*FEATX_ARCHIVE_MAX_MEMBERS"):
        unpack(archive, out, ArchiveLimits(max_members=10))
    monkeypatch.setenv("FEATX_ARCHIVE_MAX_BYTES", "5000")
    with pytest.raises(ArchiveError, match=r"over the limit of 5,000.*FEATX_ARCHIVE_MAX_BYTES"):
        unpack(archive, out)
    monkeypatch.setenv("FEATX_ARCHIVE_MAX_BYTES", "lots")
    with pytest.raises(ArchiveError, match="FEATX_ARCHIVE_MAX_BYTES='lots' is not a number"):
        unpack(archive, out)
    monkeypatch.delenv("FEATX_ARCHIVE_MAX_BYTES")
    unpack(archive, out)
    assert len(list((out / "c").iterdir())) == 20


def test_too_little_disk_space_is_refused(tmp_path, monkeypatch):
    import shutil

    archive = _zip(tmp_path / "a.zip", {"c/0.png": os.urandom(10_000)})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"needs 10,000 bytes but .* has 1,000 free"):
        unpack(archive, out)


@pytest.mark.parametrize(
    "name, content",
    [
        ("bad.zip", b"PK\x03\x04 this is not a zip at all" * 10),
        ("random.tar", os.urandom(4096)),
        ("truncated.tar.gz", None),
    ],
)
def test_a_corrupt_archive_is_a_clear_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        whole = _tar_gz(tmp_path / "whole.tar.gz", {f"c/{i}.png": os.urandom(5000) for i in range(4)})
        content = whole.read_bytes()[:-3000]
    path.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=rf"{name}: not a readable archive, or truncated"):
        unpack(path, out)


def test_unsafe_zip_members_are_refused(tmp_path):
    archive = _zip(tmp_path / "evil.zip", {"../evil.png": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match="outside the unpack folder"):
        unpack(archive, out)
    assert not (tmp_path / "evil.png").exists()


def test_a_photo_archive_unpacks_whole_within_the_default_limits(tmp_path):
    members = {f"c{i % 3}/{i}.png": os.urandom(2000) for i in range(60)}
    archive = _tar_gz(tmp_path / "ok.tar.gz", members)
    out = tmp_path / "out"
    out.mkdir()
    unpack(archive, out)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.png")} == members
