"""Image sources → manifests: folders, CSV/TSV, file lists, digits, torchvision datasets, splits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, make_image

from featx.data import Manifest, from_csv, from_digits, from_folder, from_torchvision, load_source
from featx.data.splits import DEFAULT_TEST_FRACTION, SplitPlan
from featx.exceptions import UnknownNameError
from featx.spec import OPTIONS, ExtractionSpec, Preprocessing, check_option


def test_class_folder_keeps_its_images_in_train_until_a_plan_carves_them(image_folder):
    m = from_folder(image_folder)
    assert m.class_names == ["cat", "dog", "emu"]
    assert m.ids[0] == "cat/00.png" and Path(m.paths[0]).is_absolute()
    assert m.split_counts() == {"train": 18}
    planned = m.with_plan(SplitPlan(split_seed=3, val_fraction=0.25, test_fraction=0.34))
    assert planned.split_counts() == {"train": 9, "val": 3, "test": 6}
    for c in range(3):  # stratified: two test images and one val image per class
        in_class = [s for lab, s in zip(planned.labels, planned.splits, strict=True) if lab == c]
        assert in_class.count("test") == 2 and in_class.count("val") == 1
    assert "split seed 3" in planned.split_policy
    assert m.splits == ["train"] * 18  # the manifest itself is not changed


def test_split_folders_and_val_as_test(split_folder, tmp_path):
    m = from_folder(split_folder).with_plan()
    assert m.split_counts() == {"train": 8, "val": 2, "test": 4}
    assert "val split is the test split" in m.split_policy and "val carved from train" in m.split_policy
    make_image(split_folder / "test" / "ants" / "t.jpg", seed=7)
    make_image(split_folder / "test" / "bees" / "t.jpg", seed=8)
    m3 = from_folder(split_folder).with_plan()
    assert m3.split_counts() == {"train": 10, "val": 4, "test": 2}
    assert m3.split_policy.startswith("test from the source; val from the source")


def test_folder_skips_non_images_and_explains_empty(tmp_path):
    root = tmp_path / "r"
    make_image(root / "a" / "x.png", seed=1)
    (root / "a" / "notes.txt").write_text("hi")
    (root / "a" / ".DS_Store").write_text("junk")
    make_image(root / "b" / "y.JPG", seed=2, fmt="JPEG")
    m = from_folder(root)
    assert sorted(m.ids) == ["a/x.png", "b/y.JPG"]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        from_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        from_folder(tmp_path / "missing")


def test_a_class_with_one_image_stays_in_train():
    labels = np.array([0] * 10 + [1])
    ids = [f"{i}.png" for i in range(11)]
    splits, _ = SplitPlan(val_fraction=0.2, test_fraction=0.2).assign(ids, labels, ["train"] * 11)
    assert splits[-1] == "train" and list(splits).count("test") == 2 and list(splits).count("val") == 2


def test_fractions_and_seed_are_checked_once_with_one_wording():
    assert SplitPlan().test_fraction == DEFAULT_TEST_FRACTION == 0.2
    for bad in (0, 1, 1.5, -0.1, True, "0.2", float("nan")):
        with pytest.raises(ValueError, match=re.escape(f"test_fraction must be a number in (0, 1); got {bad!r}")):
            SplitPlan(test_fraction=bad)
        with pytest.raises(ValueError, match=re.escape("val_fraction must be a number in (0, 1)")):
            SplitPlan(val_fraction=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="split_seed must be an integer of at least 0"):
            SplitPlan(split_seed=bad)


def test_every_option_has_one_check_with_close_matches():
    assert set(OPTIONS) == {"pool", "dtype", "amp", "tta", "decode", "interpolation", "fingerprint", "compile"}
    for name, option in OPTIONS.items():
        assert option.default is None or option.default in option.choices
        for value in option.choices:
            assert check_option(name, value) == value
        with pytest.raises(UnknownNameError) as info:
            check_option(name, "zzz")
        assert str(info.value) == f"unknown {option.label} 'zzz'. Choose one of {', '.join(option.choices)}."
    with pytest.raises(UnknownNameError, match=r"unknown pool 'avgmx'\. Did you mean: avgmax"):
        check_option("pool", "avgmx")
    with pytest.raises(UnknownNameError, match=r"unknown amp 'auto'\. Choose one of none, bf16, fp16\."):
        check_option("amp", "auto", ("none", "bf16", "fp16"))


def test_the_spec_validates_through_the_one_check():
    pre = Preprocessing((8, 8), 8, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    base = {"backbone": "featx:x", "weights": "w", "weights_sha256": "0", "layers": ("penultimate",)}
    ExtractionSpec(**base, preprocessing=pre)
    for field, value, label in (
        ("pool", "mean", "pool"),
        ("dtype", "float64", "dtype"),
        ("tta", "mirror", "tta"),
        ("decode", "quick", "decode"),
        ("amp", "auto", "amp"),  # a spec records the resolved precision
    ):
        with pytest.raises(UnknownNameError, match=f"unknown {label} '{value}'\\. "):
            ExtractionSpec(**base, preprocessing=pre, **{field: value})
    with pytest.raises(UnknownNameError, match=r"unknown interpolation 'cubic'\. Did you mean: bicubic"):
        Preprocessing((8, 8), 8, "cubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="max_pixels must be an integer of at least 1"):
        ExtractionSpec(**base, preprocessing=pre, max_pixels=0)


def test_csv_and_tsv_manifests(tmp_path):
    for i in range(4):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    (tmp_path / "m.csv").write_text(
        "path,label,split\nimgs/0.png,zebra,train\nimgs/1.png,yak,train\nimgs/2.png,zebra,test\nimgs/3.png,yak,val\n"
    )
    m = from_csv(tmp_path / "m.csv")
    assert m.class_names == ["yak", "zebra"]
    assert m.split_counts() == {"train": 2, "val": 1, "test": 1}
    assert m.paths[0] == str((tmp_path / "imgs" / "0.png").resolve())
    (tmp_path / "m.tsv").write_text("path\tlabel\nimgs/0.png\ta\nimgs/1.png\t\n")
    t = from_csv(tmp_path / "m.tsv")
    assert list(t.labels) == [0, -1] and t.splits[1] == "unlabeled"


def test_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match="'path' column"):
        from_csv(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(UnknownNameError, match=r"bad2.csv:2: unknown split 'holdout'"):
        from_csv(tmp_path / "bad2.csv")


def test_load_source_dispatch_and_errors(tmp_path, image_folder):
    assert load_source(image_folder).source.startswith("folder:")
    make_image(tmp_path / "p.png", seed=1)
    (tmp_path / "list.txt").write_text("p.png\n# comment\n\n")
    unlabeled = load_source(tmp_path / "list.txt")
    assert unlabeled.split_counts() == {"unlabeled": 1} and unlabeled.labels[0] == -1
    with pytest.raises(FileNotFoundError, match="A SOURCE is"):
        load_source(tmp_path / "nope")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UnknownNameError, match="suffix"):
        load_source(tmp_path / "x.json")


def test_manifest_validation():
    with pytest.raises(ValueError, match="unique"):
        Manifest(["a", "a"], ["/a", "/b"], [0, 0], ["train", "train"], ["x"], "t")
    with pytest.raises(ValueError, match="no images"):
        Manifest([], [], [], [], [], "t")


def test_digits_is_materialised_once(isolated_caches):
    m = from_digits()
    assert len(m) == 1797 and m.class_names == [str(i) for i in range(10)]
    assert m.source == "digits" and m.split_counts() == {"train": 1797}
    assert m.with_plan().split_counts() == {"train": 1151, "val": 287, "test": 359}
    assert (isolated_caches / "featx" / "sources" / "digits-v1" / ".complete").exists()
    before = Path(m.paths[0]).stat().st_mtime_ns
    assert from_digits().fingerprint() == m.fingerprint()
    assert Path(m.paths[0]).stat().st_mtime_ns == before


def test_torchvision_source_offline(monkeypatch, isolated_caches):
    import torchvision.datasets as tvd
    from PIL import Image

    calls = []

    class TinyCIFAR(tvd.VisionDataset):  # the constructor signature of torchvision's CIFAR10
        classes = ("plane", "car")

        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            super().__init__(root)
            calls.append((train, download))
            self.n = 6 if train else 2

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.new("RGB", (8, 8), (i * 20, 0, 0)), i % 2

    monkeypatch.setattr(tvd, "CIFAR10", TinyCIFAR)
    m = from_torchvision("CIFAR10")
    assert calls == [(True, True), (False, True)]
    assert m.class_names == ["plane", "car"] and m.split_counts() == {"train": 6, "test": 2}
    assert m.source == "torchvision:CIFAR10"
    assert list(m.labels[:2]) == [0, 1]
    from_torchvision("CIFAR10")  # second time: from the cache, no dataset construction
    assert len(calls) == 2
    with pytest.raises(UnknownNameError, match="CIFAR10"):
        from_torchvision("CIFAR11")


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(), reason="../shared/data/hymenoptera not present")
def test_hymenoptera_manifest():
    m = load_source(SHARED_DATA / "hymenoptera")
    assert m.class_names == ["ants", "bees"]
    assert m.split_counts() == {"train": 245, "val": 153}
    planned = m.with_plan()  # the folders' val is the test split; val is carved from train
    assert planned.split_counts() == {"train": 196, "val": 49, "test": 153}


def test_mixed_split_and_class_folders_are_refused(tmp_path):
    make_image(tmp_path / "r" / "train" / "a" / "1.png", seed=1)
    make_image(tmp_path / "r" / "extra" / "2.png", seed=2)
    with pytest.raises(ValueError, match=r"mixes split folders \(train\) with other folders \(extra\)"):
        from_folder(tmp_path / "r")


def test_materialise_never_deletes_a_complete_copy(tmp_path):
    from featx.data.sources import _materialise

    target = tmp_path / "gen"

    def write(folder):
        (folder / "x.txt").write_text("1")

    _materialise(target, write)
    inode = (target / "x.txt").stat().st_ino
    (target / ".complete").unlink()
    (target / ".complete").write_text("ok\n")
    _materialise(target, lambda folder: (_ for _ in ()).throw(AssertionError("rewritten")))
    assert (target / "x.txt").stat().st_ino == inode


def test_archives_are_unpacked_once_and_safely(tmp_path, image_folder):
    import tarfile

    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(image_folder, arcname="pets")
    m = load_source(archive)
    assert m.class_names == ["cat", "dog", "emu"] and len(m) == 18 and m.source == f"archive:{archive}"
    assert load_source(archive).fingerprint() == m.fingerprint()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../outside.png")
        data = (image_folder / "cat" / "00.png").read_bytes()
        info.size = len(data)
        import io

        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"unsafe or broken archive member|not a plain file"):
        load_source(evil)
    assert not (tmp_path / "outside.png").exists()
