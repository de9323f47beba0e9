"""The baseline rows: ``featx:pixels`` (no transfer) and the ``chance`` classifier, through every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image
from PIL import Image

from featx.backbones import load_backbone
from featx.classify import ClassifierConfig, load_model, train
from featx.cli import main
from featx.extract import extract
from featx.extract.api import build_spec
from featx.finetune import FinetuneConfig, finetune, parse_phases
from featx.spec import cache_key
from featx.store import FeatureStore


def _pixels_store(folder: Path, out: Path, backbone: str = "featx:pixels") -> Path:
    return extract(folder, backbone=backbone, out=out, progress=False, workers=0).path


def _by_hand(path: Path, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), centre crop ``size × size``, ``(x / 255 - 0.5) / 0.5``, channel-major."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = (size, int(h * scale)) if w <= h else (int(w * scale), size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    return ((arr - np.float32(127.5)) / np.float32(127.5)).transpose(2, 0, 1).reshape(-1)


@pytest.mark.parametrize(("backbone", "size"), [("featx:pixels", 16), ("featx:pixels32", 32)])
def test_pixels_are_the_resized_cropped_normalised_image_flattened(tmp_path, backbone, size):
    # 48 x 40 (wider than tall) and 30 x 52 (taller than wide): the resize and the crop both matter.
    for i, wh in enumerate(((48, 40), (30, 52))):
        make_image(tmp_path / "images" / "a" / f"{i}.png", seed=i, size=wh)
        make_image(tmp_path / "images" / "b" / f"{i}.png", seed=10 + i, size=wh)
    with FeatureStore(_pixels_store(tmp_path / "images", tmp_path / "px.h5", backbone)) as store:
        assert store.feature_dims() == {"penultimate": 3 * size * size}
        assert store.spec.weights == "none (raw pixels)"
        X = store.features("penultimate", dtype=np.float32)
        for row, image_id in enumerate(store.ids()):
            # The engine computes (x - 127.5) / 127.5 in float32 as here: the same operations, so exactly equal.
            np.testing.assert_array_equal(X[row], _by_hand(tmp_path / "images" / image_id, size))


def test_the_pixels_store_key_differs_from_lite0s(tmp_path, image_folder):
    with FeatureStore(_pixels_store(image_folder, tmp_path / "px.h5")) as store:
        key, fingerprint = store.key, store.attrs["manifest_fingerprint"]
    pixels, lite0 = load_backbone("featx:pixels"), load_backbone("featx:efficientnet_lite0")
    assert key == cache_key(build_spec(pixels, ["penultimate"]), fingerprint)
    assert key != cache_key(build_spec(lite0, ["penultimate"]), fingerprint)
    assert key != cache_key(build_spec(load_backbone("featx:pixels32"), ["penultimate"]), fingerprint)
    # No weights: the checksum is SHA-256 of nothing, the same at every load, so the key is well defined.
    assert pixels.weights_sha256 == load_backbone("featx:pixels").weights_sha256 != lite0.weights_sha256
    assert pixels.weights_sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_logreg_on_pixels_beats_chance(tmp_path, colour_folder):
    store = _pixels_store(colour_folder, tmp_path / "px.h5")
    _, logreg = train(store, ClassifierConfig(classifier="logreg"), n_jobs=1, out_dir=tmp_path / "logreg")
    _, chance = train(store, ClassifierConfig(classifier="chance"), n_jobs=1, out_dir=tmp_path / "chance")
    assert logreg["test"]["accuracy"] > chance["test"]["accuracy"]
    assert logreg["test"]["accuracy"] == 1.0  # the dominant colour is the class
    assert logreg["split"]["hashes"] == chance["split"]["hashes"]  # the same images, row for row


def _imbalanced_folder(root: Path) -> Path:
    """Three classes of 12, 6 and 4 images: the majority class is unambiguous in every split."""
    for c, (name, n) in enumerate((("few", 4), ("many", 12), ("some", 6))):
        for i in range(n):
            make_image(root / name / f"{i:02d}.png", seed=100 * c + i, size=(20, 20))
    return root


def test_chance_predicts_the_train_majority_on_every_test_image(tmp_path):
    store_path = _pixels_store(_imbalanced_folder(tmp_path / "images"), tmp_path / "px.h5")
    _, results = train(store_path, ClassifierConfig(classifier="chance"), n_jobs=1, out_dir=tmp_path / "chance")
    with FeatureStore(store_path) as store:
        majority = int(np.bincount(store.labels("train")).argmax())
        y_test, test_ids = store.labels("test"), store.ids("test")
    assert store.class_names[majority] == "many"
    test = results["test"]
    assert test["predictions"]["ids"] == test_ids
    assert test["predictions"]["predicted"] == [majority] * len(test_ids)
    assert test["accuracy"] == pytest.approx(float(np.mean(y_test == majority)))
    assert [row[0] for row in test["predictions"]["top_classes"]] == [majority] * len(test_ids)
    assert results["classifier"]["param"] == "" and results["classifier"]["chosen"] is None
    assert results["search"] is None and results["classifier"]["preprocess"] == []
    # The same results.json and model file as every other preset, the model loadable without trust.
    on_disk = json.loads((tmp_path / "chance" / "results.json").read_text())
    assert on_disk["test"]["predictions"]["predicted"] == test["predictions"]["predicted"]
    assert load_model(tmp_path / "chance" / "model.skops").meta["classifier"]["preset"] == "chance"
    with pytest.raises(ValueError, match="chance has no C or alpha"):
        ClassifierConfig(classifier="chance", value=1.0)


def test_finetuning_pixels_is_refused_naming_why_and_the_fix(tmp_path, image_folder):
    config = FinetuneConfig(phases=tuple(parse_phases("head:1:1e-2")), batch_size=8)
    with pytest.raises(ValueError, match=r"featx:pixels cannot be fine-tuned: .*no learned weights") as err:
        finetune(image_folder, "featx:pixels", config, tmp_path / "ft", progress=False)
    assert "featx:efficientnet_lite0" in str(err.value) and "featx train STORE -c logreg" in str(err.value)
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()
    cli = CliRunner().invoke(
        main, ["finetune", str(image_folder), "--backbone", "featx:pixels32", "--out", str(tmp_path / "ft32")]
    )
    assert cli.exit_code != 0
    assert "featx:pixels32 cannot be fine-tuned" in cli.output


def test_featx_backbones_lists_the_pixels_baselines():
    result = CliRunner().invoke(main, ["backbones", "--source", "featx"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("featx:")}
    assert "768-d" in lines["featx:pixels"] and "3072-d" in lines["featx:pixels32"]
    layers = CliRunner().invoke(main, ["backbones", "--layers", "featx:pixels"])
    assert layers.exit_code == 0 and "penultimate = flatten" in layers.output
