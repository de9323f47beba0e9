"""The extraction engine's speed-ups: the exact ones keep the straightforward path's numbers (bit for bit or
within float rounding); fast decoding, which changes pixels, stays close and gets a store of its own."""

from __future__ import annotations

import logging
import os
import platform
import resource

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image, ImageFile

import featx.data.imageio
import featx.store
from featx._runtime import malloc as _malloc
from featx._runtime.device import exact_float32
from featx._runtime.env import cache_dir, temporary_environ
from featx.backbones import FeatureModel
from featx.extract import extract
from featx.extract.engine import _compile_wanted

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's"
)

_BLOCK = 64 << 20  # as big as an activation map of a batch; glibc would mmap it by default


def _page_faults_touching_a_fresh_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.empty(_BLOCK, dtype=np.uint8)
    block[::4096] = 1
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_freed_blocks_are_reused_inside_the_context_and_handed_back_after(monkeypatch):
    monkeypatch.delenv("FEATX_MALLOC_TUNING", raising=False)
    # glibc's default maps a fresh block each time: it faults in again (in 4 KiB or 2 MiB pages).
    fresh = _page_faults_touching_a_fresh_block()
    assert fresh >= _BLOCK // (2 << 20)
    with _malloc.reuse_freed_memory() as active:
        assert active
        _page_faults_touching_a_fresh_block()  # grows the heap once
        assert _page_faults_touching_a_fresh_block() * 4 < fresh  # ...and reuses it
    assert _malloc._depth == 0
    assert _page_faults_touching_a_fresh_block() * 2 > fresh  # the defaults are back


def test_nested_uses_restore_only_at_the_outermost_exit(monkeypatch):
    class RecordingLibc:  # what reuse_freed_memory asks of glibc, in order
        def __init__(self):
            self.calls = []

        def mallopt(self, param, value):
            self.calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            self.calls.append(("malloc_trim", pad))
            return 1

    libc = RecordingLibc()
    monkeypatch.setattr(_malloc, "_glibc", lambda: libc)
    monkeypatch.delenv("FEATX_MALLOC_TUNING", raising=False)
    tuned = [("mallopt", _malloc._M_MMAP_MAX, 0), ("mallopt", _malloc._M_TRIM_THRESHOLD, _malloc._NEVER_TRIM)]
    with _malloc.reuse_freed_memory():
        with _malloc.reuse_freed_memory():
            assert libc.calls == tuned  # tuned once, by the outermost entry
        assert libc.calls == tuned and _malloc._depth == 1  # the inner exit restored nothing
    assert libc.calls[2:] == [
        ("mallopt", _malloc._M_MMAP_MAX, _malloc._DEFAULT_MMAP_MAX),
        ("mallopt", _malloc._M_TRIM_THRESHOLD, _malloc._DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0),
    ]
    assert _malloc._depth == 0


def test_malloc_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FEATX_MALLOC_TUNING", "0")
    with _malloc.reuse_freed_memory() as active:
        assert not active
    with _malloc.reuse_freed_memory(enabled=False) as active:
        assert not active


def test_malloc_tuning_leaves_the_features_bit_identical(image_folder, tmp_path, monkeypatch):
    tuned = extract(image_folder, TINY, out=tmp_path / "tuned.h5", workers=0, progress=False)
    monkeypatch.setenv("FEATX_MALLOC_TUNING", "0")
    plain = extract(image_folder, TINY, out=tmp_path / "plain.h5", workers=0, progress=False)
    with featx.store.open(tuned.path) as a, featx.store.open(plain.path) as b:
        np.testing.assert_array_equal(a.features(), b.features())


def test_compile_auto_only_pays_on_big_cpu_jobs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not _compile_wanted("auto", cpu, 1_000)
    assert _compile_wanted("auto", cpu, 50_000)
    assert not _compile_wanted("auto", cuda, 50_000)  # not measured on a GPU yet
    assert _compile_wanted("on", cuda, 1) and not _compile_wanted("off", cpu, 10**9)


def test_unknown_compile_mode_is_refused_before_any_work(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"compile mode 'fast'.*auto, on, off"):
        extract(image_folder, TINY, out=tmp_path / "s.h5", compile_mode="fast", progress=False)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.slow
def test_compiled_features_match_eager_float32(image_folder, tmp_path, no_store_reuse):
    # 18 images in batches of 8: the last batch (2 images) is padded to the compiled shape.
    eager = extract(image_folder, TINY, out=tmp_path / "eager.h5", batch_size=8, compile_mode="off", progress=False)
    fast = extract(image_folder, TINY, out=tmp_path / "fast.h5", batch_size=8, compile_mode="on", progress=False)
    assert fast.key == eager.key  # how the network was run is not part of what the features are
    with featx.store.open(eager.path) as a, featx.store.open(fast.path) as b:
        np.testing.assert_allclose(b.features(), a.features(), rtol=0, atol=1e-4)
        assert b.info()["stats"]["compiled"] is True


def test_a_model_that_does_not_compile_falls_back_to_eager(image_folder, tmp_path, no_store_reuse, monkeypatch, caplog):
    def broken_compile(model, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = extract(image_folder, TINY, out=tmp_path / "eager.h5", workers=0, compile_mode="off", progress=False)
    with caplog.at_level(logging.WARNING, logger="featx.extract"):
        fallback = extract(image_folder, TINY, out=tmp_path / "fb.h5", workers=0, compile_mode="on", progress=False)
    assert "torch.compile failed (RuntimeError: no C++ compiler found); extracting eagerly" in caplog.text
    with featx.store.open(eager.path) as a, featx.store.open(fallback.path) as b:
        np.testing.assert_array_equal(a.features(), b.features())
        assert b.info()["stats"]["compiled"] is False


def test_extraction_runs_the_folded_network_and_records_it(image_folder, tmp_path, no_store_reuse, monkeypatch):
    # The plumbing: TINY's batch norms are timm's identity init, so the numerics of folding are tested
    # in test_backbones.py, on random statistics.
    folded = extract(image_folder, TINY, out=tmp_path / "folded.h5", workers=0, progress=False)
    monkeypatch.setattr(FeatureModel, "with_batchnorm_folded", lambda self: self)
    plain = extract(image_folder, TINY, out=tmp_path / "plain.h5", workers=0, progress=False)
    assert folded.key == plain.key  # how the network was run is not part of what the features are
    with featx.store.open(folded.path) as a, featx.store.open(plain.path) as b:
        np.testing.assert_allclose(a.features(), b.features(), rtol=1e-5, atol=1e-6)
        assert a.info()["stats"]["batchnorms_folded"] > 0
        assert b.info()["stats"]["batchnorms_folded"] == 0


# ------------------------------------------------------------------------------------------ fast decoding
def _photo(path, size=(1200, 900)) -> None:
    """A smooth, photo-like JPEG (gradients and soft discs), big enough for reduced-scale decoding."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 255], axis=-1)
    for cx, cy, r in ((0.3, 0.4, 0.2), (0.7, 0.6, 0.15)):
        arr[(xx - cx * w) ** 2 + (yy - cy * h) ** 2 < (r * w) ** 2] = (230, 60, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=92)


def test_fast_decode_reduces_big_jpegs_and_stays_close_to_exact(tmp_path):
    from featx.data.imageio import load_for_model, load_rgb
    from featx.spec import Preprocessing

    _photo(tmp_path / "big.jpg")
    assert load_rgb(tmp_path / "big.jpg", draft_size=256).size == (600, 450)  # 1/2: 1/4 would go under 256
    assert load_rgb(tmp_path / "big.jpg", draft_size=500).size == (1200, 900)  # no smaller scale keeps 500
    Image.open(tmp_path / "big.jpg").save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", draft_size=256).size == (1200, 900)  # only JPEGs have DCT scales
    pre = Preprocessing((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    diffs = {}
    for name in ("big.jpg", "big.png"):
        exact = load_for_model(tmp_path / name, pre, 10**8).int()
        fast = load_for_model(tmp_path / name, pre, 10**8, decode="fast").int()
        assert fast.shape == exact.shape == (3, 224, 224)
        diffs[name] = (fast - exact).abs()
        assert diffs[name].float().mean() < 1.5, name  # a level or so on average, not another image
    png_diff = diffs["big.png"]
    assert png_diff.max() <= 2 and (png_diff > 0).float().mean() < 0.05  # crop-region resize: rounding only


def test_fast_decode_is_a_different_store_and_says_so(tmp_path):
    from featx.spec import ExtractionSpec

    for i in range(4):
        _photo(tmp_path / "photos" / ("a" if i % 2 else "b") / f"{i}.jpg", size=(1000 + 40 * i, 760))
    exact = extract(tmp_path / "photos", TINY, out=tmp_path / "exact.h5", workers=0, progress=False)
    fast = extract(tmp_path / "photos", TINY, out=tmp_path / "fast.h5", workers=0, decode="fast", progress=False)
    assert fast.key != exact.key and fast.spec.decode == "fast"
    assert "decode" not in exact.spec.to_dict()  # stores made before the option existed keep their keys
    assert ExtractionSpec.from_dict(exact.spec.to_dict()).decode == "exact"
    with featx.store.open(exact.path) as a, featx.store.open(fast.path) as b:
        assert b.spec.decode == "fast"
        np.testing.assert_allclose(b.features(), a.features(), rtol=0, atol=0.1 * np.abs(a.features()).max())
    with pytest.raises(ValueError, match=r"unknown decode 'quick'.*exact, fast"):
        extract(tmp_path / "photos", TINY, out=tmp_path / "bad.h5", decode="quick", progress=False)


# ---------------------------------------------------------------------------------- process-wide state
def _global_state() -> dict:
    """What extraction could change for the whole process: the environment, TF32, Pillow's flags."""
    return {
        "environ": dict(os.environ),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "load_truncated": ImageFile.LOAD_TRUNCATED_IMAGES,
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
    }


@pytest.mark.parametrize("user_cache", [None, "mine"])
def test_extract_leaves_the_process_as_it_found_it(image_folder, tmp_path, monkeypatch, user_cache):
    """The inductor cache folder and Pillow's truncated-image switch hold only while extract() runs."""
    import torch._dynamo  # its first import sets TORCHINDUCTOR_CACHE_DIR: PyTorch's doing, not featx's

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a caller's own choice
    if user_cache is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / user_cache))
    seen: dict = {}

    def fake_compile(model, **kwargs):  # compiling for real takes a minute; the environment is what counts
        seen["inductor_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        return model

    def decode(*args, **kwargs):  # inside load_rgb: truncated files must be reported, not padded
        seen.setdefault("load_truncated", ImageFile.LOAD_TRUNCATED_IMAGES)
        return decode_file(*args, **kwargs)

    decode_file = featx.data.imageio._load_rgb
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(featx.data.imageio, "_load_rgb", decode)
    before = _global_state()
    result = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, compile_mode="on", progress=False)
    assert _global_state() == before
    expected = str(tmp_path / user_cache) if user_cache else str(cache_dir() / "inductor")
    assert seen == {"inductor_cache": expected, "load_truncated": False}
    with featx.store.open(result.path) as store:
        assert store.info()["stats"]["compiled"] is True  # the compiled path did run


def test_float32_on_cuda_turns_tf32_off_only_inside_the_block():
    cuda = torch.device("cuda")  # a device object needs no GPU: the settings are what is tested
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")  # a caller's choice a boolean restore would lose
        torch.backends.cudnn.allow_tf32 = True
        with exact_float32(cuda):
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            with exact_float32(cuda):  # nested (or a second thread): the outermost exit restores
                pass
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
        for device, amp in ((cuda, "bf16"), (torch.device("cpu"), "none")):  # no float32 asked for, or no TF32
            with exact_float32(device, amp):
                assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn


def test_temporary_settings_count_their_users_and_restore_at_the_last_exit(monkeypatch):
    monkeypatch.delenv("FEATX_TEST_VAR", raising=False)
    outer, inner = temporary_environ("FEATX_TEST_VAR", "a"), temporary_environ("FEATX_TEST_VAR", "a")
    with outer:
        inner.__enter__()
        assert os.environ["FEATX_TEST_VAR"] == "a"
    assert os.environ["FEATX_TEST_VAR"] == "a"  # the inner user is still inside (another thread, say)
    inner.__exit__(None, None, None)
    assert "FEATX_TEST_VAR" not in os.environ
    monkeypatch.setenv("FEATX_TEST_VAR", "user")
    with temporary_environ("FEATX_TEST_VAR", "a", keep_existing=True):
        assert os.environ["FEATX_TEST_VAR"] == "user"
    with temporary_environ("FEATX_TEST_VAR", "a"):
        assert os.environ["FEATX_TEST_VAR"] == "a"
    assert os.environ["FEATX_TEST_VAR"] == "user"
