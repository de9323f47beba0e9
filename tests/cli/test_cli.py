"""The command line: options validated before any work, summaries, info, and the real built-in backbone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA, TINY

import featx.store
from featx.cli import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def no_image_reads(monkeypatch):
    """Fail the test if any image is decoded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an image was read before the options were validated")

    monkeypatch.setattr("featx.extract.engine.load_for_model", forbidden)
    monkeypatch.setattr("featx.data.imageio.load_rgb", forbidden)


def _extract(runner, *args):
    return runner.invoke(main, ["extract", *args], catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--backbone", "torchvision:resnet5"], 1, "Did you mean: resnet50"),
        (["--backbone", "featx:efficientnet_lite"], 1, "featx:efficientnet_lite0"),
        (["--backbone", "resnet50"], 1, "has no source"),
        (["--layer", "blocks.9"], 1, "featx backbones --layers"),
        (["--pool", "median"], 2, "'median' is not one of"),
        (["--batch-size", "0"], 2, "batch-size"),
        (["--dtype", "int8"], 2, "int8"),
        (["--max-failures", "lots"], 2, "a count (e.g. 10), a percentage"),
        (["--test-fraction", "1.5"], 2, "test-fraction"),
        (["--device", "tpu"], 1, "not a torch device"),
    ],
)
def test_bad_options_fail_before_any_image_is_read(runner, image_folder, tmp_path, no_image_reads, args, code, message):
    base = [str(image_folder), "--backbone", TINY, "--workers", "0", "--out", str(tmp_path / "s.h5")]
    result = _extract(runner, *base, *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_on_a_cpu_machine_is_a_clear_error(runner, image_folder, tmp_path, no_image_reads):
    result = _extract(
        runner, str(image_folder), "--backbone", TINY, "--device", "cuda", "--out", str(tmp_path / "s.h5")
    )
    assert result.exit_code == 1 and "no CUDA GPU" in result.output and "--device cpu" in result.output


def test_missing_source(runner, tmp_path):
    result = _extract(runner, str(tmp_path / "nowhere"), "--backbone", TINY)
    assert result.exit_code == 1 and "does not exist" in result.output


def test_extract_then_info_then_cache_hit(runner, image_folder, tmp_path):
    out = tmp_path / "s.h5"
    args = [
        str(image_folder),
        "--backbone",
        TINY,
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
        "--layer",
        "penultimate",
        "--layer",
        "blocks.2",
        "--pool",
        "avgmax",
        "--tta",
        "flip",
    ]
    first = _extract(runner, *args)
    assert first.exit_code == 0, first.output
    assert "extracted 18 of 18 images, 0 failed" in first.output and str(out) in first.output
    second = _extract(runner, *args)
    assert second.exit_code == 0 and "cache hit" in second.output

    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0
    for expected in (
        "featx:tiny_test",
        "penultimate: [18, 256]",
        "blocks.2: [18, 64]",
        "avgmax",
        "tta flip",
        "train 12, val 3, test 3",  # the source has train only: the default split plan carves the others
        "versions",
        "torch",
    ):
        assert expected in info.output, expected
    as_json = json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)
    assert as_json["spec"]["layers"] == ["penultimate", "blocks.2"] and as_json["rows"] == 18


def test_progress_off_a_terminal_is_plain_log_lines(runner, image_folder, tmp_path, caplog):
    caplog.set_level("INFO", logger="featx.progress")
    result = _extract(runner, str(image_folder), "--backbone", TINY, "--workers", "0", "--out", str(tmp_path / "s.h5"))
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "\x1b[" not in result.output  # no bar redraws, no cursor moves
    assert any(r.getMessage().startswith("extract: 18/18 img (100 %)") for r in caplog.records)


def test_info_on_an_unfinished_store_says_how_to_resume(runner, tmp_path):
    from featx.store import partial_path

    work = partial_path(tmp_path / "s.h5")
    work.mkdir()
    (work / "job.json").write_text(json.dumps({"rows": 10}))
    result = runner.invoke(main, ["info", str(tmp_path / "s.h5")])
    assert result.exit_code == 1 and "0 of 10 images" in result.output and "resume" in result.output


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"


def test_info_on_a_model_file_describes_the_model(runner):
    result = runner.invoke(main, ["info", str(FIXTURES / "logreg" / "model.skops")])
    assert result.exit_code == 0, result.output
    assert "HDF5" not in result.output and "damaged" not in result.output
    assert "classifier  logreg" in result.output and "featx predict" in result.output
    as_json = json.loads(runner.invoke(main, ["info", str(FIXTURES / "logreg" / "model.skops"), "--json"]).output)
    assert as_json["kind"] == "model" and as_json["classifier"]["preset"] == "logreg"


def test_info_on_a_finetune_folder_describes_the_network(runner):
    result = runner.invoke(main, ["info", str(FIXTURES / "finetune")])
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output and "featx extract SOURCE --backbone" in result.output


def test_backbones_lists_the_builtin(runner):
    result = runner.invoke(main, ["backbones", "--source", "featx"])
    assert result.exit_code == 0 and "featx:efficientnet_lite0" in result.output


def test_tta_flip_averages_image_and_mirror(image_folder, tmp_path):
    from featx.extract import extract

    plain = extract(image_folder, TINY, out=tmp_path / "a.h5", workers=0, progress=False)
    flip = extract(image_folder, TINY, out=tmp_path / "b.h5", workers=0, progress=False, tta="flip")
    mirrored = tmp_path / "mirrored"
    from PIL import Image, ImageOps

    for path in image_folder.rglob("*.png"):
        target = mirrored / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(path)).save(target)
    mirror = extract(mirrored, TINY, out=tmp_path / "c.h5", workers=0, progress=False)
    with featx.store.open(plain.path) as a, featx.store.open(flip.path) as b, featx.store.open(mirror.path) as c:
        np.testing.assert_allclose(b.features(), (a.features() + c.features()) / 2, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_extraction_matches_cpu(image_folder, tmp_path):
    from featx.extract import extract

    cpu = extract(image_folder, TINY, out=tmp_path / "cpu.h5", device="cpu", workers=0, progress=False)
    gpu32 = extract(image_folder, TINY, out=tmp_path / "g32.h5", device="cuda", amp="none", workers=2, progress=False)
    bf16 = extract(image_folder, TINY, out=tmp_path / "g16.h5", device="cuda", workers=2, progress=False)
    assert bf16.spec.amp in ("bf16", "fp16") and bf16.key != gpu32.key
    with featx.store.open(cpu.path) as a, featx.store.open(gpu32.path) as b, featx.store.open(bf16.path) as c:
        np.testing.assert_allclose(b.features(), a.features(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(c.features(), a.features(), rtol=5e-2, atol=5e-2)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(), reason="../shared/data/hymenoptera not present")
def test_hymenoptera_with_the_builtin_backbone(runner, tmp_path):
    out = tmp_path / "hymenoptera.h5"
    args = [str(SHARED_DATA / "hymenoptera"), "--out", str(out), "--no-progress", "--max-failures", "1"]
    t0 = time.perf_counter()
    first = _extract(runner, *args)
    first_seconds = time.perf_counter() - t0
    assert first.exit_code == 0, first.output
    t0 = time.perf_counter()
    second = _extract(runner, *args)
    assert second.exit_code == 0 and "cache hit" in second.output
    assert time.perf_counter() - t0 < first_seconds / 3
    with featx.store.open(out) as store:
        assert store.spec.backbone == "featx:efficientnet_lite0"
        assert store.splits["train"] + store.splits["val"] + len(store.failures) == 245
        assert store.splits["test"] == 153 and store.splits["val"] == 49
        # A linear probe on real ImageNet features separates ants from bees well.
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=2000).fit(store.features(split="train"), store.labels("train"))
        assert clf.score(store.features(split="test"), store.labels("test")) > 0.9
