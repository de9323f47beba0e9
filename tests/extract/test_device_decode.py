"""``decode="device"``: JPEGs decoded, resized and cropped in batches on the extraction device (here the CPU; the
``gpu`` tests run the same on CUDA). Pixels stay within two levels of the exact path, features within float
tolerance of its features, hostile images fail as they do with ``exact``, and the store has a key of its own.

Measured tolerances (``device=cpu``, torchvision's libjpeg-turbo against Pillow's): on 120 hymenoptera photos at
224 px, the largest difference is 1 level (bilinear) or 2 (bicubic), and 0.2-0.4 % of the pixels differ at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, TINY, make_image
from PIL import Image
from test_images import BAD, GOOD, LAST_GOOD, _build_zoo, write_cmyk_jpeg, write_exif_rotated, write_truncated_jpeg
from test_store import _STALLING_RUN

import featx.store
from featx.data.imageio import load_for_model
from featx.exceptions import ImageDecodeError
from featx.extract import extract
from featx.extract.device_decode import DeviceDecoder, jpeg_decodable, read_for_device
from featx.spec import ExtractionSpec, Preprocessing

TESTS = Path(__file__).resolve().parents[1]
PRE = Preprocessing((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
#: The stated pixel tolerance against the exact path, in levels of 0-255, and the share of pixels that may differ.
MAX_LEVELS, MAX_SHARE_DIFFERENT = 2, 0.01
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _photo(path: Path, size=(640, 480), seed: int = 0) -> Path:
    """A photo-like JPEG: smooth gradients, a disc, mild noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 255], axis=-1)
    arr[(xx - 0.4 * w) ** 2 + (yy - 0.5 * h) ** 2 < (0.2 * min(w, h)) ** 2] = (230, 60, 40)
    arr += np.random.default_rng(seed).normal(scale=6, size=arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def _crops(paths: list[Path], pre: Preprocessing, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The device path's crops and the exact path's, for JPEGs the device path takes."""
    encoded = [read_for_device(p, pre, 10**8) for p in paths]
    assert all(t.ndim == 1 for t in encoded)
    decoder = DeviceDecoder([str(p) for p in paths], pre, torch.device(device), 10**8)
    done, crops, failed = decoder(list(range(len(paths))), encoded)
    assert done == list(range(len(paths))) and not failed and decoder.fallbacks == 0
    exact = torch.stack([load_for_model(p, pre) for p in paths])
    return torch.stack(crops).cpu(), exact


def _assert_close_pixels(device: torch.Tensor, exact: torch.Tensor, share: float = MAX_SHARE_DIFFERENT) -> None:
    assert device.shape == exact.shape and device.dtype == torch.uint8
    diff = (device.int() - exact.int()).abs()
    assert diff.max() <= MAX_LEVELS, diff.max()
    assert (diff > 0).float().mean() < share, (diff > 0).float().mean()


# ------------------------------------------------------------------------------------------ which path
def test_only_plain_upright_colour_jpegs_go_to_the_device(tmp_path):
    plain = read_for_device(_photo(tmp_path / "plain.jpg"), PRE, 10**8)
    assert plain.ndim == 1 and plain.dtype == torch.uint8  # the file's bytes, for the device
    assert bytes(plain.numpy()) == (tmp_path / "plain.jpg").read_bytes()
    upright = tmp_path / "upright.jpg"
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.open(tmp_path / "plain.jpg").save(upright, exif=exif.tobytes())
    assert read_for_device(upright, PRE, 10**8).ndim == 1
    Image.open(tmp_path / "plain.jpg").save(tmp_path / "progressive.jpg", progressive=True)
    assert read_for_device(tmp_path / "progressive.jpg", PRE, 10**8).ndim == 1
    exact_way = [
        write_cmyk_jpeg(tmp_path / "cmyk.jpg"),
        write_exif_rotated(tmp_path / "rot6.jpg"),
        make_image(tmp_path / "grey.jpg", seed=1, mode="L"),
        make_image(tmp_path / "rgb.png", seed=2),
    ]
    for path in exact_way:
        out = read_for_device(path, PRE, 10**8)
        assert out.ndim == 3, path.name  # decoded here, the exact way
        assert torch.equal(out, load_for_model(path, PRE)), path.name
    with pytest.raises(ImageDecodeError, match="max_pixels"):  # over max_pixels: the exact path refuses
        read_for_device(tmp_path / "plain.jpg", PRE, 640 * 480 - 1)
    with pytest.raises(ImageDecodeError, match="truncated"):
        read_for_device(write_truncated_jpeg(tmp_path / "cut.jpg"), PRE, 10**8)
    for interpolation in ("lanczos", "nearest"):  # no tensor lanczos, and nearest-exact is not Pillow's: exact
        pre = Preprocessing((224, 224), 256, interpolation, (0.5,) * 3, (0.5,) * 3)
        assert read_for_device(tmp_path / "plain.jpg", pre, 10**8).ndim == 3


def test_header_check_refuses_what_it_cannot_vouch_for(tmp_path):
    data = _photo(tmp_path / "p.jpg").read_bytes()
    assert jpeg_decodable(data, 10**8)
    assert not jpeg_decodable(data[:-2], 10**8)  # no end marker: maybe truncated
    assert not jpeg_decodable(b"\x89PNG" + data[4:], 10**8)
    assert not jpeg_decodable(data[:2] + b"\x00" + data[3:], 10**8)  # a marker that is not one
    assert not jpeg_decodable(data[:2] + b"\xff\xe0\x00\x01" + data[2:], 10**8)  # a segment length under 2
    assert not jpeg_decodable(data, 640 * 480 - 1)
    twelve_bit = bytearray(data)
    twelve_bit[data.index(b"\xff\xc0") + 4] = 12  # the frame's sample precision
    assert not jpeg_decodable(bytes(twelve_bit), 10**8)


# ------------------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (200, 150)], ids=["land", "port", "sq", "up"])
def test_pixels_are_within_two_levels_of_exact(tmp_path, interpolation, size):
    pre = Preprocessing((224, 224), 256, interpolation, (0.5,) * 3, (0.5,) * 3)
    paths = [_photo(tmp_path / f"{i}.jpg", size=size, seed=i) for i in range(3)]
    _assert_close_pixels(*_crops(paths, pre))


def test_non_square_crop_wider_than_the_image_is_padded_as_exact_pads(tmp_path):
    pre = Preprocessing((64, 200), 72, "bilinear", (0.5,) * 3, (0.5,) * 3)
    # A 0.72 down-scale of a noisy image: 7.5 % of the pixels one level off (filter weights rounded apart).
    _assert_close_pixels(*_crops([_photo(tmp_path / "tall.jpg", size=(100, 300))], pre), share=0.1)


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(), reason="../shared/data/hymenoptera not present")
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_pixels_on_real_photos(interpolation):
    pre = Preprocessing((224, 224), 256, interpolation, (0.5,) * 3, (0.5,) * 3)
    paths = sorted((SHARED_DATA / "hymenoptera").rglob("*.jpg"))[::8]
    assert len(paths) >= 40
    _assert_close_pixels(*_crops(paths, pre))


# ---------------------------------------------------------------------------------------- the engine
def _photos(root: Path, n: int = 10) -> Path:
    for i in range(n):
        _photo(root / ("a" if i % 2 else "b") / f"{i:02d}.jpg", size=(320 + 16 * i, 240), seed=i)
    make_image(root / "a" / "png.png", seed=3)  # not a JPEG: decoded in a worker, exactly
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_features_match_exact_and_the_store_has_its_own_key(tmp_path, workers):
    source = _photos(tmp_path / "photos")
    runs = {
        mode: extract(source, TINY, out=tmp_path / f"{mode}.h5", workers=workers, decode=mode, progress=False)
        for mode in ("exact", "fast", "device")
    }
    device = runs["device"]
    assert len({r.key for r in runs.values()}) == 3  # a store of its own, apart from exact and fast
    assert device.spec.decode == "device" and device.spec.to_dict()["decode"] == "device"
    assert ExtractionSpec.from_dict(device.spec.to_dict()) == device.spec
    assert "decode" not in runs["exact"].spec.to_dict()  # old keys unchanged
    assert device.n_done == 11 and device.n_failed == 0
    with featx.store.open(runs["exact"].path) as a, featx.store.open(device.path) as b:
        assert b.spec.decode == "device" and a.ids() == b.ids()
        exact, feats = a.features(), b.features()
    scale = np.abs(exact).max()
    np.testing.assert_allclose(feats, exact, rtol=0, atol=0.02 * scale)  # two levels on a few pixels at most
    assert np.abs(feats - exact).mean() < 0.002 * scale
    again = extract(source, TINY, out=tmp_path / "device.h5", workers=workers, decode="device", progress=False)
    assert again.cached and again.key == device.key


def test_hostile_images_fail_as_with_exact_decoding(tmp_path):
    zoo = _build_zoo(tmp_path / "zoo")
    runs = {
        mode: extract(zoo, TINY, out=tmp_path / f"{mode}.h5", workers=0, batch_size=3, decode=mode, progress=False)
        for mode in ("exact", "device")
    }
    exact, device = runs["exact"], runs["device"]
    assert device.n_done == exact.n_done == len(GOOD) + 1
    assert {f.id: f.reason for f in device.failures} == {f.id: f.reason for f in exact.failures}
    assert {f.id for f in device.failures} == BAD.keys()
    with featx.store.open(exact.path) as a, featx.store.open(device.path) as b:
        assert a.ids() == b.ids() == sorted([*GOOD, LAST_GOOD])
        ids = a.ids()
        not_jpeg = [k for k, i in enumerate(ids) if i != "plain/01_rgb.jpg"]  # all but the one plain JPEG: exact
        np.testing.assert_array_equal(b.features()[not_jpeg], a.features()[not_jpeg])
        np.testing.assert_allclose(b.features(), a.features(), rtol=0, atol=0.05 * np.abs(a.features()).max())


def test_what_the_device_decoder_rejects_is_decoded_exactly(tmp_path, monkeypatch):
    import torchvision.io

    paths = [_photo(tmp_path / f"{i}.jpg", seed=i) for i in range(3)]
    encoded = [read_for_device(p, PRE, 10**8) for p in paths]
    real = torchvision.io.decode_jpeg
    rejected = len(encoded[1])

    def picky(data, **kwargs):
        if isinstance(data, list) or len(data) == rejected:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    decoder = DeviceDecoder([str(p) for p in paths], PRE, torch.device("cpu"), 10**8)
    done, crops, failed = decoder([0, 1, 2], encoded)
    assert done == [0, 1, 2] and not failed and decoder.fallbacks == 1
    assert torch.equal(crops[1], load_for_model(paths[1], PRE))  # the rejected one: the exact path's pixels
    paths[2].write_bytes(b"gone bad since")  # the exact path refuses it too: a recorded failure
    done, crops, failed = DeviceDecoder([str(p) for p in paths], PRE, torch.device("cpu"), 10**8)([2], [encoded[1]])
    assert done == [] and failed == [(2, failed[0][1])] and "not an image" in failed[0][1]


@pytest.mark.slow
def test_killed_device_decode_run_resumes_to_the_same_store(tmp_path):
    source = _photos(tmp_path / "photos", n=15)
    out = tmp_path / "killed.h5"
    script = tmp_path / "stalling_run.py"
    script.write_text(_STALLING_RUN.format(tests=str(TESTS), parts=2))  # the store tests' stalling writer
    args = ["extract", str(source), "--backbone", TINY, "--batch-size", "4", "--no-progress", "--out", str(out)]
    writer = subprocess.Popen(
        [sys.executable, str(script), *args, "--decode", "device", "--workers", "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline() == "stalled\n", "the run ended before writing 2 batches"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer.pid, signal.SIGKILL)
        writer.communicate()
    assert not out.exists()
    resumed = extract(source, TINY, out=out, batch_size=4, workers=0, decode="device", progress=False)
    assert resumed.resumed_rows == 8 and resumed.images_this_run == 8
    reference = extract(source, TINY, out=tmp_path / "ref.h5", batch_size=4, workers=0, decode="device", progress=False)
    with featx.store.open(out) as a, featx.store.open(reference.path) as b:
        assert a.key == b.key and a.ids() == b.ids()
        np.testing.assert_array_equal(a.features(), b.features())


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_pixels_are_close_to_exact(tmp_path):
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels, not two."""
    paths = [_photo(tmp_path / f"{i}.jpg", size=(500 + 20 * i, 375), seed=i) for i in range(6)]
    if (SHARED_DATA / "hymenoptera").is_dir():
        paths += sorted((SHARED_DATA / "hymenoptera").rglob("*.jpg"))[::16]
    device, exact = _crops(paths, PRE, device="cuda")
    diff = (device.int() - exact.int()).abs().float()
    assert diff.mean() < 1.5 and torch.quantile(diff.flatten()[::7], 0.999) <= 16, (diff.mean(), diff.max())


@pytest.mark.gpu
@needs_cuda
def test_device_decode_on_cuda_matches_exact_on_the_cpu(tmp_path):
    source = _photos(tmp_path / "photos")
    cpu = extract(source, TINY, out=tmp_path / "cpu.h5", device="cpu", workers=0, progress=False)
    gpu = extract(source, TINY, out=tmp_path / "gpu.h5", device="cuda", amp="none", decode="device", progress=False)
    zoo = _build_zoo(tmp_path / "zoo")
    hostile = extract(zoo, TINY, out=tmp_path / "z.h5", device="cuda", decode="device", batch_size=3, progress=False)
    assert {f.id for f in hostile.failures} == BAD.keys() and hostile.n_done == len(GOOD) + 1
    with featx.store.open(cpu.path) as a, featx.store.open(gpu.path) as b:
        scale = np.abs(a.features()).max()
        np.testing.assert_allclose(b.features(), a.features(), rtol=0, atol=0.1 * scale)
        assert np.abs(b.features() - a.features()).mean() < 0.01 * scale
