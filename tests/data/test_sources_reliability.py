"""Reliability of image sources and the command line: bounded archives that clean up after themselves, one id per
file, manifests that are not UTF-8, and Ctrl-C at any moment."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY, make_image
from test_reliability import _tar_gz, _zip  # the archive builders of the unpacker's own tests

import featx.data.archives
import featx.exceptions
from featx.cli import main
from featx.data import from_csv, from_folder, load_source
from featx.data.sources import _materialise
from featx.exceptions import ArchiveError

# ---------------------------------------------------------------------------------------------- archives


def _bomb(tmp_path: Path) -> Path:
    return _zip(tmp_path / "bomb.zip", {"c/zeros.png": bytes(20 << 20)})


def _bad_zip(tmp_path: Path) -> Path:
    path = tmp_path / "bad.zip"
    path.write_bytes(b"PK\x03\x04 this is not a zip at all" * 10)
    return path


def _random_tar(tmp_path: Path) -> Path:
    path = tmp_path / "random.tar"
    path.write_bytes(os.urandom(4096))
    return path


def _truncated_tar_gz(tmp_path: Path) -> Path:
    whole = _tar_gz(tmp_path / "whole.tar.gz", {f"c{i % 2}/{i}.png": os.urandom(5000) for i in range(8)})
    path = tmp_path / "truncated.tar.gz"
    path.write_bytes(whole.read_bytes()[:-3000])
    whole.unlink()
    return path


BROKEN = {
    "bomb": (_bomb, r"bomb\.zip: expands .*FEATX_ARCHIVE_MAX_RATIO"),
    "bad zip": (_bad_zip, r"bad\.zip: not a readable archive, or truncated"),
    "random tar": (_random_tar, r"random\.tar: not a readable archive, or truncated"),
    "truncated tar.gz": (_truncated_tar_gz, r"truncated\.tar\.gz: not a readable archive, or truncated"),
}


def _leftovers(isolated_caches: Path) -> list[str]:
    sources = isolated_caches / "featx" / "sources"
    return sorted(p.name for p in sources.glob("*")) if sources.is_dir() else []


def test_the_library_and_the_unpacker_raise_one_archive_error():
    assert featx.data.archives.ArchiveError is featx.exceptions.ArchiveError
    assert issubclass(ArchiveError, ValueError)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_archive_is_a_clear_error_and_leaves_nothing_in_the_cache(tmp_path, isolated_caches, kind):
    make, message = BROKEN[kind]
    with pytest.raises(ArchiveError, match=message):
        load_source(make(tmp_path))
    assert _leftovers(isolated_caches) == []


@pytest.mark.parametrize("kind", list(BROKEN))
def test_extract_of_a_broken_archive_says_which_file_and_exits_1(tmp_path, isolated_caches, kind):
    make, message = BROKEN[kind]
    archive = make(tmp_path)
    args = ["extract", str(archive), "--backbone", TINY, "--workers", "0", "--out", str(tmp_path / "s.h5")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Aborted!" not in result.output and "Traceback" not in result.output
    assert result.output.startswith("error: ")
    assert re.search(message, result.output), result.output
    assert _leftovers(isolated_caches) == []
    assert not (tmp_path / "s.h5").exists()


def test_a_good_archive_still_unpacks_once_under_the_same_name(tmp_path, isolated_caches, image_folder):
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(image_folder.rglob("*.png")):
            zf.write(file, f"pets/{file.relative_to(image_folder)}")
    m = load_source(archive)
    assert m.class_names == ["cat", "dog", "emu"] and len(m) == 18 and m.ids[0] == "cat/00.png"
    (folder,) = _leftovers(isolated_caches)
    assert folder.startswith("archive-pets-") and ".tmp-" not in folder
    assert load_source(archive).fingerprint() == m.fingerprint()


def test_materialise_removes_its_temporary_folder_when_writing_fails(tmp_path):
    target = tmp_path / "sources" / "gen"

    def write(folder: Path) -> None:
        (folder / "half.txt").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _materialise(target, write)
    assert sorted(p.name for p in (tmp_path / "sources").iterdir()) == []


# ------------------------------------------------------------------------------------------ one id per file


def _three_names_for_one_file(tmp_path: Path) -> Path:
    make_image(tmp_path / "img" / "a1.jpg", seed=1, fmt="JPEG")
    make_image(tmp_path / "img" / "b1.jpg", seed=2, fmt="JPEG")
    make_image(tmp_path / "img" / "c1.jpg", seed=3, fmt="JPEG")
    absolute = tmp_path / "img" / "a1.jpg"
    (tmp_path / "m.csv").write_text(
        "path,label,split\n"
        "img/a1.jpg,cat,train\n"
        "img/b1.jpg,dog,train\n"
        "./img/a1.jpg,dog,test\n"
        "img/c1.jpg,cat,test\n"
        f"{absolute},cat,val\n"
    )
    return tmp_path / "m.csv"


def test_one_file_under_three_names_in_a_csv_is_refused_naming_the_rows(tmp_path):
    manifest = _three_names_for_one_file(tmp_path)
    with pytest.raises(ValueError) as info:
        from_csv(manifest)
    text = str(info.value)
    assert "m.csv" in text and "a1.jpg" in text
    for row in ("line 2 'img/a1.jpg'", "line 4 './img/a1.jpg'", f"line 6 '{tmp_path / 'img' / 'a1.jpg'}'"):
        assert row in text, text
    assert "once" in text  # the fix: list each image once
    result = CliRunner().invoke(main, ["extract", str(manifest), "--backbone", TINY, "--workers", "0"])
    assert result.exit_code == 1 and "line 4 './img/a1.jpg'" in result.output, result.output


def test_a_symlink_in_an_image_folder_is_the_file_it_points_to(tmp_path):
    root = tmp_path / "r"
    for c in ("cat", "dog"):
        for i in range(3):
            make_image(root / c / f"{i}.png", seed=10 * len(c) + i)
    (root / "dog" / "stray.png").symlink_to(root / "cat" / "0.png")
    with pytest.raises(ValueError, match=r"'cat/0\.png'.*'dog/stray\.png'|'dog/stray\.png'.*'cat/0\.png'"):
        from_folder(root)


def test_distinct_files_keep_their_ids(tmp_path):
    make_image(tmp_path / "img" / "a1.jpg", seed=1, fmt="JPEG")
    make_image(tmp_path / "img" / "b1.jpg", seed=2, fmt="JPEG")
    (tmp_path / "m.csv").write_text("path,label,split\n./img/a1.jpg,cat,train\nimg/b1.jpg,dog,test\n")
    assert from_csv(tmp_path / "m.csv").ids == ["./img/a1.jpg", "img/b1.jpg"]


def test_content_fingerprint_refuses_byte_identical_files_across_splits(tmp_path, caplog):
    for i in range(3):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "img" / "copy.png").write_bytes((tmp_path / "img" / "0.png").read_bytes())
    (tmp_path / "m.csv").write_text(
        "path,label,split\nimg/0.png,a,train\nimg/1.png,b,train\nimg/2.png,a,test\nimg/copy.png,b,test\n"
    )
    m = from_csv(tmp_path / "m.csv")
    with caplog.at_level(logging.WARNING, logger="featx"):
        stat_fp = m.fingerprint("stat")
    assert not caplog.records and stat_fp.startswith("images-stat:")
    with pytest.raises(ValueError, match="byte-identical") as info:
        m.fingerprint("content")
    assert "img/0.png (train)" in str(info.value) and "img/copy.png (test)" in str(info.value)
    (tmp_path / "m2.csv").write_text("path,label,split\nimg/0.png,a,train\nimg/copy.png,a,train\nimg/1.png,b,test\n")
    with caplog.at_level(logging.WARNING, logger="featx"):
        content_fp = from_csv(tmp_path / "m2.csv").fingerprint("content")
    assert not caplog.records and content_fp.startswith("images-content:")  # copies within one split: no leak


# ----------------------------------------------------------------------------------------- text encodings


def test_a_latin1_manifest_names_the_file_the_line_and_the_fix(tmp_path):
    make_image(tmp_path / "café.png", seed=1)
    (tmp_path / "m.csv").write_bytes("path,label\ncafé.png,crème\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_source(tmp_path / "m.csv")
    text = str(info.value)
    assert "m.csv:2" in text and "UTF-8" in text and "0xe9" in text.lower() and "save" in text.lower(), text
    (tmp_path / "list.txt").write_bytes("café.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"list\.txt:1: not UTF-8"):
        load_source(tmp_path / "list.txt")
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "m.csv"), "--backbone", TINY])
    assert result.exit_code == 1 and "m.csv:2" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------- Ctrl-C

_CHILD = textwrap.dedent(
    """
    import runpy, signal, sys, time
    # A shell's background job starts with SIGINT ignored, and children inherit that: restore Python's handler
    # so the test's SIGINT interrupts the run like Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    class Pause:  # stops at the first import of one module, as a slow import (torch: seconds) does
        def find_spec(self, name, path=None, target=None):
            if name == {module!r}:
                sys.meta_path.remove(self)
                print("ready", flush=True)
                time.sleep(60)

    sys.meta_path.insert(0, Pause())
    sys.argv[0] = "featx"
    runpy.run_module({entry!r}, run_name="__main__")
    """
)


@pytest.mark.parametrize(
    ("entry", "module"),
    [
        ("featx", "featx.cli.extraction"),  # while the command line loads
        ("featx", "torch"),  # while the options are parsed or the command imports torch
        ("featx.cli", "torch"),  # `python -m featx.cli`
    ],
    ids=["loading-the-cli", "command-imports", "python-m-featx.cli"],
)
def test_ctrl_c_in_the_first_seconds_exits_130_with_featx_message(tmp_path, image_folder, entry, module):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(entry=entry, module=module))
    args = [sys.executable, str(script), "extract", str(image_folder), "--out", str(tmp_path / "s.h5")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; run the same command again." in stderr, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "s.h5").exists()


def test_a_truncated_file_anywhere_is_an_error_not_aborted(tmp_path, image_folder, monkeypatch):
    def truncated(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr("featx.extract.api.load_source", truncated)
    result = CliRunner().invoke(main, ["extract", str(image_folder), "--backbone", TINY, "--workers", "0"])
    assert result.exit_code == 1 and result.output == "error: Ran out of input\n", result.output
