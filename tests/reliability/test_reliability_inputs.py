"""Hostile and careless inputs that once cost gigabytes, crashed, leaked across splits or passed silently (issue 27).

Each test failed before its fix. See docs/reliability.md, "Bounded work, full disks and silent oddities".
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, make_image, store_writer, synthetic_store
from PIL import Image

import featx.store.format as format_module
import featx.store.writer as writer_module
from featx.cli import main
from featx.data import from_csv, from_folder
from featx.data.archives import unpack
from featx.data.imageio import check_resized_size, load_for_model, load_rgb, preprocess_uint8
from featx.data.splits import SplitPlan
from featx.exceptions import ArchiveError, DiskFullError, ImageDecodeError, StoreLockedError
from featx.extract import extract
from featx.extract.device_decode import jpeg_decodable
from featx.spec import DEFAULT_MAX_PIXELS, Preprocessing
from featx.store import FeatureStore, StoreWriter, partial_path

PRE = Preprocessing(input_size=(64, 64), resize_size=72, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)


def _strip(path: Path, size: tuple[int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path, format=fmt)
    return path


def _writer(path: Path, folder: Path, dims: int = 4, dtype: str = "float32") -> StoreWriter:
    return store_writer(path, from_folder(folder), dims, dtype=dtype)


# --------------------------------------------------------------------- 1. an image's work is bounded
@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_a_strip_image_is_refused_by_its_resized_size_before_any_resize(tmp_path, decode):
    strip = _strip(tmp_path / "strip.png", (400, 2))  # 800 pixels; resized to 72 x 14,400 = 1,036,800
    with pytest.raises(ImageDecodeError, match=r"400x2: resizing its shorter side to 72 .*14400x72 = 1,036,800"):
        load_for_model(strip, PRE, max_pixels=100_000, decode=decode)
    assert load_for_model(strip, PRE, max_pixels=2_000_000, decode=decode).shape == (3, 64, 64)


def test_the_110_byte_strip_of_the_issue_is_refused_at_the_default_limit_without_resizing():
    imagenet = Preprocessing((224, 224), 256, "bilinear", (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImageDecodeError, match=r"2560000x256 = 655,360,000 pixels, over the max_pixels"):
        check_resized_size(10_000, 1, imagenet, DEFAULT_MAX_PIXELS)
    check_resized_size(4000, 3000, imagenet, DEFAULT_MAX_PIXELS)  # a photo: 341 x 256
    check_resized_size(20_000, 100, imagenet, DEFAULT_MAX_PIXELS)  # a 200:1 panorama: 51,200 x 256


def test_normal_images_keep_their_exact_pixels(tmp_path):
    photo = make_image(tmp_path / "p.png", seed=3, size=(90, 70))
    expected = preprocess_uint8(load_rgb(photo), PRE)
    assert np.array_equal(load_for_model(photo, PRE).numpy(), expected.numpy())


def test_the_device_path_leaves_a_strip_jpeg_to_the_exact_path_which_refuses_it(tmp_path):
    data = _strip(tmp_path / "s.jpg", (400, 8), fmt="JPEG").read_bytes()
    assert jpeg_decodable(data, 100_000)
    assert not jpeg_decodable(data, 100_000, PRE)  # resized: 3600 x 72 = 259,200 pixels
    assert jpeg_decodable(data, 10**6, PRE)


def test_a_strip_in_a_job_is_a_recorded_failure(image_folder, tmp_path):
    _strip(image_folder / "cat" / "strip.png", (400, 2))
    result = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False, max_pixels=200_000)
    (failure,) = result.failures
    assert failure.id == "cat/strip.png" and "resizing its shorter side" in failure.reason
    assert result.n_done == 18


def test_a_fine_tune_skips_a_strip_up_front_instead_of_failing_at_evaluation(image_folder):
    from featx.finetune.data import _readable

    _strip(image_folder / "cat" / "strip.png", (400, 2))
    m = from_folder(image_folder)
    ok, bad = _readable(m, np.arange(len(m)), 200_000, PRE)
    assert len(ok) == 18 and bad == [("cat/strip.png", bad[0][1])] and "resizing its shorter side" in bad[0][1]


# --------------------------------------------------------------------------- 2. a full disk
def _extract_args(folder: Path, out: Path) -> dict:
    return {"source": folder, "backbone": TINY, "out": out, "workers": 0, "progress": False, "batch_size": 8}


def test_too_little_free_space_is_refused_before_assembling_and_the_batches_resume(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    real = format_module.shutil.disk_usage
    monkeypatch.setattr(format_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskFullError, match=r"disk of .*s\.h5\.partial for assembling .*s\.h5: it needs about"):
        extract(**_extract_args(image_folder, out))
    assert not out.exists() and len(list(partial_path(out).glob("part-*.npz"))) == 3
    monkeypatch.undo()
    result = extract(**_extract_args(image_folder, out))
    assert result.resumed_rows == 18 and result.images_this_run == 0 and out.is_file()


def test_a_disk_that_fills_during_assembly_is_the_same_clear_error(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "Can't synchronously write data (No space left on device)")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(DiskFullError, match=r"needs about .* MiB there") as info:
        extract(**_extract_args(image_folder, out))
    assert info.value.errno == errno.ENOSPC and "rows already saved are kept and resume" in str(info.value)
    assert sorted(p.name for p in partial_path(out).iterdir() if not p.name.startswith("part-")) == ["job.json", "lock"]
    monkeypatch.undo()
    assert extract(**_extract_args(image_folder, out)).resumed_rows == 18


def test_space_set_aside_by_a_killed_assembly_is_given_back(image_folder, tmp_path):
    out = tmp_path / "s.h5"
    partial_path(out).mkdir()
    (partial_path(out) / "assembling-99999.h5.reserve").write_bytes(b"\0" * 1000)  # kill -9 while assembling
    with _writer(out, image_folder):
        assert not (partial_path(out) / "assembling-99999.h5.reserve").exists()


def test_a_full_disk_while_saving_a_batch_names_the_folder(image_folder, tmp_path, monkeypatch):
    def full(target, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    with _writer(tmp_path / "s.h5", image_folder) as w:
        monkeypatch.setattr(writer_module, "atomic_write", full)
        with pytest.raises(DiskFullError, match=r"s\.h5\.partial for .*saving a batch"):
            w.write_batch(np.array([0]), {"penultimate": np.ones((1, 4))})
    with pytest.raises(DiskFullError, match=r"s2\.h5\.partial for starting the job of .*s2\.h5: the disk has"):
        _writer(tmp_path / "s2.h5", image_folder).__enter__()


def test_the_cli_exits_1_on_a_full_disk(image_folder, tmp_path, monkeypatch):
    real = format_module.shutil.disk_usage
    monkeypatch.setattr(format_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    args = ["extract", str(image_folder), "--backbone", TINY, "--out", str(tmp_path / "s.h5"), "--workers", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "no space left on the disk" in res.output and "Traceback" not in res.output


def test_joining_shards_on_a_full_disk_is_the_same_clear_error(tmp_path, monkeypatch):
    from featx.store.join import concatenate

    part = synthetic_store(tmp_path / "part.h5")
    real = format_module.shutil.disk_usage
    monkeypatch.setattr(format_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskFullError, match=r"for joining 2 stores into .*joined\.h5: it needs about .*join again"):
        concatenate([part, part], tmp_path / "joined.h5", key="k")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.h5"]
    with FeatureStore(concatenate([part, part], tmp_path / "joined.h5", key="k")) as joined:
        assert len(joined) == 240


_FILL_A_REAL_DISK = """
import shutil, sys
from pathlib import Path
import numpy as np
import featx.store.format as f
import featx.store.writer as w
from featx.data import Manifest
from featx.exceptions import DiskFullError
from featx.spec import ExtractionSpec, Preprocessing, cache_key

real = shutil.disk_usage
f.shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)  # the check passes: the disk fills during the writes
n, dims = 24, 65536  # 6 MiB of features: the parts fit on the 16 MiB disk, a second copy does not
ids = [f"{i}.png" for i in range(n)]
m = Manifest(ids, ids, np.zeros(n, dtype=int), ["train"] * n, ["a"], "synthetic")
pre = Preprocessing((64, 64), 72, "bilinear", (0.5,) * 3, (0.5,) * 3)
spec = ExtractionSpec("featx:tiny_test", "w", "0" * 64, ("penultimate",), pre)
fp = m.fingerprint()
with w.StoreWriter(Path(sys.argv[1]) / "s.h5", spec, cache_key(spec, fp), m, fp, {"penultimate": dims}) as sw:
    for start in range(0, n, 8):
        sw.write_batch(np.arange(start, start + 8), {"penultimate": np.ones((8, dims))})
    try:
        sw.finalize({})
    except DiskFullError as exc:
        print("DISKFULL", exc)
"""


def test_a_real_full_disk_during_assembly_is_an_error_not_a_segfault(tmp_path):
    """On a 16 MiB tmpfs (needs root): h5py used to crash with a segfault when its writes met a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        script = tmp_path / "fill.py"
        script.write_text(textwrap.dedent(_FILL_A_REAL_DISK))
        res = subprocess.run([sys.executable, str(script), str(disk)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "DISKFULL no space left on the disk of" in res.stdout and "rows already saved are kept" in res.stdout
        assert len(list((disk / "s.h5.partial").glob("part-*.npz"))) == 3 and not (disk / "s.h5").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------------------- 3. one file in two splits
def test_a_hard_link_across_splits_is_refused_like_a_symlink(split_folder):
    os.link(split_folder / "train" / "bees" / "0.jpg", split_folder / "val" / "bees" / "h.jpg")
    with pytest.raises(ValueError, match=r"\(hard-linked\) as 'train/bees/0\.jpg' \(train, bees\), 'val/bees/h\.jpg'"):
        from_folder(split_folder)


def test_a_hard_link_in_a_manifest_is_refused(tmp_path):
    make_image(tmp_path / "img" / "a.png", seed=1)
    make_image(tmp_path / "img" / "b.png", seed=2)
    os.link(tmp_path / "img" / "a.png", tmp_path / "img" / "a2.png")
    (tmp_path / "m.csv").write_text("path,label,split\nimg/a.png,x,train\nimg/b.png,y,train\nimg/a2.png,x,test\n")
    with pytest.raises(ValueError, match=r"line 2 'img/a\.png' \(train, x\), line 4 'img/a2\.png' \(test, x\)"):
        from_csv(tmp_path / "m.csv")


def test_extract_with_content_fingerprint_refuses_copies_across_splits(split_folder, tmp_path):
    copy = split_folder / "val" / "ants" / "copy.jpg"
    copy.write_bytes((split_folder / "train" / "ants" / "0.jpg").read_bytes())
    args = ["extract", str(split_folder), "--backbone", TINY, "--out", str(tmp_path / "s.h5"), "--workers", "0"]
    res = CliRunner().invoke(main, [*args, "--fingerprint", "content"])
    assert res.exit_code == 1 and "train/ants/0.jpg (train) = val/ants/copy.jpg (val)" in res.output
    assert CliRunner().invoke(main, args).exit_code == 0  # stat fingerprints cannot see content


# ------------------------------------------------------------------- 4. an unreadable class folder
def test_an_unreadable_class_folder_is_refused_never_dropped(image_folder, monkeypatch):
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "dog":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=r"1 folder cannot be read.*dog \(Permission denied\).*chmod"):
        from_folder(image_folder)


def test_an_unreadable_subfolder_and_root_are_refused_too(image_folder, monkeypatch):
    make_image(image_folder / "cat" / "deep" / "x.png", seed=9)
    real = os.scandir
    refused = {"deep"}

    def scandir(path="."):
        if Path(path).name in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=r"cat/deep \(Permission denied\)"):
        from_folder(image_folder)
    refused.add(image_folder.name)
    with pytest.raises(PermissionError, match=r"images \(Permission denied\)"):
        from_folder(image_folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_a_chmod_000_class_folder_is_refused(image_folder):
    (image_folder / "dog").chmod(0)
    try:
        with pytest.raises(PermissionError, match="dog"):
            from_folder(image_folder)
    finally:
        (image_folder / "dog").chmod(0o755)


# ------------------------------------------------------------------------ 5. non-finite features
def test_non_finite_rows_are_failures_with_a_reason(image_folder, tmp_path):
    out = tmp_path / "s.h5"
    with _writer(out, image_folder) as w:
        feats = np.ones((18, 4), dtype=np.float32)
        feats[3, 1], feats[7, 0] = np.nan, np.inf
        w.write_batch(np.arange(18), {"penultimate": feats})
        w.finalize({})
    with FeatureStore(out) as fs:
        assert {f.row for f in fs.failures} == {3, 7} and len(fs.rows(include_failed=False)) == 16
        assert all("non-finite features (NaN or infinity) in layer penultimate" in f.reason for f in fs.failures)
        assert np.isfinite(fs.features()).all()


def test_float16_overflow_is_a_failure_that_says_so(image_folder, tmp_path):
    with _writer(tmp_path / "s.h5", image_folder, dtype="float16") as w:
        feats = np.ones((2, 4), dtype=np.float32)
        feats[1, 2] = 1e6
        w.write_batch(np.array([0, 1]), {"penultimate": feats})
        assert w.failed == {1: w.failed[1]} and "overflow float16" in w.failed[1] and "--dtype float32" in w.failed[1]


def test_extract_with_nan_weights_records_every_image_as_failed(image_folder, tmp_path, monkeypatch):
    from featx.extract import engine

    real = engine._Embedder.__call__

    def nan_features(self, images):
        return {k: v * float("nan") for k, v in real(self, images).items()}

    monkeypatch.setattr(engine._Embedder, "__call__", nan_features)
    args = ["extract", str(image_folder), "--backbone", TINY, "--out", str(tmp_path / "s.h5"), "--workers", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and "18 failed" in res.output, res.output  # over --max-failures: exit 3


def test_train_names_the_store_and_the_rows_of_an_old_store_with_nan_features(tmp_path):
    store = synthetic_store(tmp_path / "s.h5")
    with h5py.File(store, "r+") as f:
        f["features/penultimate"][5, 0] = np.nan
    res = CliRunner().invoke(main, ["train", str(store), "-c", "logreg", "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "s.h5: 1 row of features/penultimate holds non-finite features" in res.output
    assert "rows [5] (ids 'img00005.png')" in res.output and "--overwrite" in res.output


# -------------------------------------------------------------------- 7. a resumed store's stats
def test_a_resumed_store_counts_the_work_of_every_run(image_folder, tmp_path, no_store_reuse, monkeypatch):
    whole = extract(**_extract_args(image_folder, tmp_path / "whole.h5"))
    out = tmp_path / "s.h5"

    def killed(self, stats=None):
        raise KeyboardInterrupt  # every batch saved, the store never assembled

    with monkeypatch.context() as patch:
        patch.setattr(StoreWriter, "finalize", killed)
        with pytest.raises(KeyboardInterrupt):
            extract(**_extract_args(image_folder, out))
    resumed = extract(**_extract_args(image_folder, out))
    assert resumed.resumed_rows == 18 and resumed.images_this_run == 0
    with FeatureStore(whole.path) as a, FeatureStore(out) as b:
        first, second = json.loads(a.attrs["stats"]), json.loads(b.attrs["stats"])
    assert second["images"] == first["images"] == 18 and second["seconds"] > 0
    assert second["batchnorms_folded"] == first["batchnorms_folded"] > 0
    assert second["compiled"] == first["compiled"] and second["images_per_second"] > 0
    res = CliRunner().invoke(main, ["info", str(out)])
    assert "extraction  18 images in" in res.output and "resumed, 18 rows from earlier runs" in res.output


# ---------------------------------------------------------------------- 12. silent oddities
def test_shots_beyond_the_smallest_class_are_left_out_and_said(tmp_path, caplog):
    from featx.classify import ClassifierConfig, train
    from featx.classify.fewshot import drawable_shots

    y = np.array([0] * 5 + [1] * 9 + [-1])
    with caplog.at_level(logging.WARNING, logger="featx"):
        assert drawable_shots(y, ["ants", "bees"], [1, 5, 6, 1000, "all"], "s.h5") == [1, 5, "all"]
    assert "s.h5: learning-curve points 6, 1000 left out: class 'ants' has 5 training images" in caplog.text
    store = synthetic_store(tmp_path / "s.h5", per_class=10)  # 6 train images per class, 1 of them carved to val
    with pytest.raises(ValueError, match=r"shots \[1000\]: class 'class0' has 5 training images.*up to 5"):
        train(store, ClassifierConfig("logreg"), shots=[1000], n_jobs=1)  # refused before any fit


def test_a_class_with_one_image_is_named_as_never_tested(caplog):
    ids = [f"{c}{i}" for c in "ab" for i in range(10)] + ["lonely"]
    labels = np.array([0] * 10 + [1] * 10 + [2])
    with caplog.at_level(logging.WARNING, logger="featx"):
        splits, policy = SplitPlan().assign(ids, labels, ["train"] * 21, ["ants", "bees", "wasp"])
    assert splits[-1] == "train" and "class 'wasp' (1 image) has no val or test image" in policy
    assert "cover only the 2 of 3 classes that have test images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featx"):
        _, policy = SplitPlan().assign(ids[:20], labels[:20], ["train"] * 20, ["ants", "bees"])
    assert "has no" not in policy and not caplog.records


def _tar(path: Path, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("pets/cat/0.png")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"abc"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        info.size = 3 if kind == tarfile.REGTYPE else 0
        tf.addfile(info, io.BytesIO(b"abc") if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "linkname", "why"),
    [
        ("/pets/dog/0.png", tarfile.REGTYPE, "", "has an absolute path"),
        ("pets/dog/h.png", tarfile.LNKTYPE, "pets/cat/0.png", "is not a plain file"),
        ("pets/dog/s.png", tarfile.SYMTYPE, "../cat/0.png", "is not a plain file"),
    ],
)
def test_tar_members_with_absolute_paths_or_links_are_refused_as_documented(tmp_path, name, kind, linkname, why):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=rf"member '{name}' {why}"):
        unpack(_tar(tmp_path / "a.tar", name, kind, linkname), out)
    assert not (out / "pets" / "dog").exists()


def test_a_second_writer_is_refused_before_the_model_loads(image_folder, tmp_path, monkeypatch):
    import featx.extract.api as api

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the lock was checked")

    out = tmp_path / "s.h5"
    with _writer(out, image_folder):
        monkeypatch.setattr(api, "_load_network", no_model)
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            extract(image_folder, TINY, out=out, workers=0, progress=False)
    writer_module.check_not_locked(tmp_path / "new.h5")
    assert not partial_path(tmp_path / "new.h5").exists()  # the check creates nothing
