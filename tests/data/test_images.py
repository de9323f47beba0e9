"""Hostile image files: each one is decoded correctly or becomes a failure with its reason; the job goes on.

Every file is generated into ``tmp_path`` (no binary fixtures): empty files, truncated JPEGs, text
named ``.jpg``, CMYK and 16-bit images, RGBA and palette PNGs, animations, EXIF-rotated photos,
decompression bombs, broken links, FIFOs. Then the same zoo goes through :func:`featx.extract.extract`
and the ``featx extract`` command.
"""

from __future__ import annotations

import builtins
import errno
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_image
from PIL import Image, ImageFile, ImageOps, features

import featx.store
from featx.cli import main
from featx.data.imageio import load_rgb, preprocess_uint8
from featx.exceptions import ImageDecodeError
from featx.extract import extract
from featx.spec import DEFAULT_MAX_PIXELS, Preprocessing

ORIENTATION = 0x0112
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# ------------------------------------------------------------------------------------------ writers
def _random_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, scanlines: bytes) -> bytes:
    """A minimal PNG, for what Pillow cannot write (16-bit RGB, a header claiming a huge size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(scanlines))
        + _png_chunk(b"IEND", b"")
    )


def _halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    """An image whose left half is one colour and right half another."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_truncated_jpeg(path: Path, keep: float = 0.5) -> Path:
    _random_rgb((96, 64), seed=1).save(path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_text(path: Path, text: str = "this is not a photo, it is a text file with a .jpg name\n") -> Path:
    path.write_text(text)
    return path


def write_broken_symlink(path: Path) -> Path:
    path.symlink_to(path.parent / "this-target-does-not-exist.jpg")
    return path


def write_huge_png_header(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims ``side``×``side`` pixels: refused from the header, never decoded."""
    path.write_bytes(_png_bytes(side, side, 8, 0, b"\x00" * 64))
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    """Four 16-px strips: red, green, blue, white (in CMYK)."""
    img = Image.new("CMYK", (64, 16))
    for i, cmyk in enumerate([(0, 255, 255, 0), (255, 0, 255, 0), (255, 255, 0, 0), (0, 0, 0, 0)]):
        img.paste(Image.new("CMYK", (16, 16), cmyk), (16 * i, 0))
    img.save(path, format="JPEG", quality=95)
    return path


def write_gray16(path: Path, fmt: str = "PNG") -> Path:
    """16-bit greyscale, four 8-px strips: 0, 1000, 32768, 65535."""
    values = np.repeat(np.array([0, 1000, 32768, 65535], dtype=np.uint16), 8)
    arr = np.tile(values, (8, 1))
    if fmt == "TIFF":
        arr = arr.astype(">u2")  # big-endian, mode I;16B
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_rgba_transparent(path: Path) -> Path:
    Image.new("RGBA", (40, 30), (12, 34, 56, 0)).save(path, format="PNG")
    return path


def write_palette_transparent(path: Path) -> Path:
    """Palette PNG: left half index 0 (transparent), right half index 1 (dark red)."""
    img = _halves((40, 30), 0, 1, mode="P")
    img.putpalette([10, 20, 30, 200, 0, 0] + [0] * (254 * 3))
    img.save(path, format="PNG", transparency=0)
    return path


def write_animation(path: Path, fmt: str = "GIF") -> Path:
    """Three frames: red, blue, green; the first frame is the image."""
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, BLUE, GREEN)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return path


def write_exif_rotated(path: Path, orientation: int = 6) -> Path:
    """40×20 stored pixels, left half red, right half blue, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    _halves((40, 20), RED, BLUE).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def _near(pixel, colour, tol: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour, dtype=int)) <= tol))


def _refused(path: Path, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------ refused files
def test_zero_byte_file(tmp_path):
    reason = _refused(write_empty(tmp_path / "empty.jpg"))
    assert "empty" in reason


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9, 0.99])
def test_truncated_jpeg(tmp_path, keep):
    assert "truncated" in _refused(write_truncated_jpeg(tmp_path / "cut.jpg", keep))


def test_jpeg_cut_inside_its_header_is_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    _random_rgb((96, 64)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:40])
    assert _refused(path).startswith("truncated image")  # Pillow says "Truncated File Read" here


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_other_truncated_formats(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    _random_rgb((96, 64)).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in _refused(path)


def test_truncated_jpeg_refused_even_if_pillow_was_told_to_pad(tmp_path, monkeypatch):
    """A library user's LOAD_TRUNCATED_IMAGES=True must not turn a cut file into a grey-padded one."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated" in _refused(write_truncated_jpeg(tmp_path / "cut.jpg"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # featx switches it off only while it decodes


@pytest.mark.parametrize(
    "content",
    [
        "this is not a photo\n",
        "<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        bytes(range(256)) * 4,
    ],
    ids=["text", "html", "binary"],
)
def test_not_an_image(tmp_path, content):
    path = tmp_path / "fake.jpg"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_text(path, content)
    assert "not an image" in _refused(path)


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    assert "directory" in _refused(tmp_path / "x.jpg")


def test_missing_file(tmp_path):
    assert "not found" in _refused(tmp_path / "nope.jpg")


def test_broken_symlink(tmp_path):
    reason = _refused(write_broken_symlink(tmp_path / "link.jpg"))
    assert "symbolic link" in reason
    assert "does not exist" in reason


def test_fifo_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    outcome: list[BaseException | object] = []

    def target():
        try:
            outcome.append(load_rgb(path))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # unblock the reader so the test run does not hang, then fail
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=5)
        pytest.fail("load_rgb blocked on a FIFO")
    assert isinstance(outcome[0], ImageDecodeError)
    assert "not a regular file" in str(outcome[0])


def test_unreadable_file(tmp_path, monkeypatch):
    path = make_image(tmp_path / "secret.png", seed=3)
    path.chmod(0)
    try:
        with open(path, "rb"):
            readable = True  # root ignores file permissions: simulate the denial instead
    except PermissionError:
        readable = False
    if readable:
        real_open = builtins.open

        def denying_open(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", denying_open)
    try:
        reason = _refused(path)
    finally:
        monkeypatch.undo()
        path.chmod(0o644)
    assert "cannot read file" in reason
    assert "ermission denied" in reason


def test_unexpected_decoder_exceptions_become_decode_errors(tmp_path, monkeypatch):
    """Corrupt metadata makes Pillow raise struct.error, KeyError, ...: still one reason, not a crash."""

    def corrupt_exif(image, **kwargs):
        raise struct.error("unpack requires a buffer of 12 bytes")

    monkeypatch.setattr(ImageOps, "exif_transpose", corrupt_exif)
    reason = _refused(make_image(tmp_path / "ok.jpg", seed=4))
    assert reason.startswith("cannot decode")
    assert "unpack requires" in reason


# ------------------------------------------------------------------------------ decompression bombs
def test_max_pixels_refuses_an_ordinary_image(tmp_path):
    path = make_image(tmp_path / "small.png", seed=5, size=(30, 20))
    reason = _refused(path, max_pixels=100)
    assert "30x20" in reason
    assert "600" in reason
    assert "limit of 100" in reason
    assert "max_pixels" in reason
    assert load_rgb(path, max_pixels=600).size == (30, 20)  # the limit is inclusive


@pytest.mark.parametrize("side", [10_000, 100_000], ids=["over-featx-limit", "over-pillow-hard-limit"])
def test_huge_png_header_refused_without_decoding(tmp_path, side):
    path = write_huge_png_header(tmp_path / "bomb.png", side)
    assert path.stat().st_size < 200
    reason = _refused(path)
    assert "decompression-bomb" in reason
    assert f"{DEFAULT_MAX_PIXELS:,}" in reason
    assert "max_pixels" in reason


def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path, monkeypatch):
    """Pillow's global guard must not overrule a larger ``max_pixels``; the global is restored."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow itself would refuse 600 px (> 2 × 100)
    path = make_image(tmp_path / "img.png", seed=6, size=(30, 20))
    assert load_rgb(path, max_pixels=10_000).size == (30, 20)
    assert Image.MAX_IMAGE_PIXELS == 100
    assert "limit of 500" in _refused(path, max_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---------------------------------------------------------------------------------- converted files
def test_cmyk_jpeg_becomes_rgb_with_the_right_colours(tmp_path):
    img = load_rgb(write_cmyk_jpeg(tmp_path / "cmyk.jpg"))
    assert img.mode == "RGB"
    assert img.size == (64, 16)
    arr = np.asarray(img)
    for i, colour in enumerate([RED, GREEN, BLUE, WHITE]):
        assert _near(arr[8, 16 * i + 8], colour, tol=16), (i, arr[8, 16 * i + 8])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_is_scaled_not_clipped(tmp_path, fmt):
    path = write_gray16(tmp_path / f"g16.{fmt.lower()}", fmt)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    arr = np.asarray(load_rgb(path)).astype(int)
    assert arr.shape == (8, 32, 3)
    assert (arr == arr[..., :1]).all()  # grey stays grey
    strip = arr[4, ::8, 0]
    assert np.abs(strip - [0, 4, 128, 255]).max() <= 1, strip  # convert("L") would give 0, 255, 255, 255


def test_16bit_rgb_png(tmp_path):
    pixel = struct.pack(">HHH", 65535, 32768, 0)
    rows = b"".join(b"\x00" + pixel * 6 for _ in range(4))
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_bytes(6, 4, 16, 2, rows))
    arr = np.asarray(load_rgb(path))
    assert arr.shape == (4, 6, 3)
    assert _near(arr[2, 3], (255, 128, 0), tol=1)


def test_32bit_float_tiff(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((6, 8), 0.5, dtype=np.float32)).save(path)
    assert _near(np.asarray(load_rgb(path))[3, 3], (128, 128, 128), tol=1)


def test_fully_transparent_rgba_is_white(tmp_path):
    img = load_rgb(write_rgba_transparent(tmp_path / "clear.png"))
    assert img.mode == "RGB"
    assert (np.asarray(img) == 255).all()


def test_half_transparent_rgba_is_composited_over_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 128)).save(path)
    assert _near(np.asarray(load_rgb(path))[5, 5], (127, 127, 127), tol=1)


def test_greyscale_with_alpha(tmp_path):
    path = tmp_path / "la.png"
    _halves((20, 10), (50, 0), (50, 255), mode="LA").save(path)
    arr = np.asarray(load_rgb(path))
    assert _near(arr[5, 2], WHITE, tol=0)
    assert _near(arr[5, 17], (50, 50, 50), tol=0)


def test_palette_png_with_transparency(tmp_path):
    img = load_rgb(write_palette_transparent(tmp_path / "pal.png"))
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert _near(arr[15, 5], WHITE, tol=0)  # the transparent index
    assert _near(arr[15, 35], (200, 0, 0), tol=0)  # an opaque index keeps its colour


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_colour_key_transparency_is_composited(tmp_path, mode):
    """tRNS colour keys in RGB and greyscale PNGs are transparency too."""
    key, other = ((10, 20, 30), (90, 80, 70)) if mode == "RGB" else (7, 90)
    path = tmp_path / "keyed.png"
    _halves((20, 10), key, other, mode=mode).save(path, transparency=key)
    arr = np.asarray(load_rgb(path))
    assert _near(arr[5, 2], WHITE, tol=0)
    assert _near(arr[5, 17], (90, 80, 70) if mode == "RGB" else (90, 90, 90), tol=0)


@pytest.mark.parametrize("mode", ["L", "1", "P", "I"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("img.tif" if mode == "I" else "img.png")
    src = _random_rgb((24, 16), seed=7).convert("L")
    img = src.convert(mode) if mode != "I" else Image.fromarray(np.asarray(src).astype(np.int32))
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.size == (24, 16)
    if mode in ("L", "I"):
        assert (np.asarray(out)[..., 0] == np.asarray(src)).all()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_its_first_frame(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    path = write_animation(tmp_path / f"anim.{fmt.lower()}", fmt)
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    arr = np.asarray(img).reshape(-1, 3)
    assert all(_near(p, RED, tol=3) for p in arr[::97])


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, RED, BLUE), (8, BLUE, RED)],  # 6: turn 90° clockwise to view (left → top); 8: counter-clockwise
)
def test_exif_rotation_is_applied(tmp_path, orientation, top, bottom):
    path = write_exif_rotated(tmp_path / "rot.jpg", orientation)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[ORIENTATION] == orientation
    img = load_rgb(path)
    assert img.size == (20, 40)  # transposed
    arr = np.asarray(img)
    assert _near(arr[8, 10], top, tol=40), arr[8, 10]
    assert _near(arr[31, 10], bottom, tol=40), arr[31, 10]


def test_exif_rotate_180_keeps_the_size(tmp_path):
    img = load_rgb(write_exif_rotated(tmp_path / "rot.jpg", 3))
    assert img.size == (40, 20)
    arr = np.asarray(img)
    assert _near(arr[10, 5], BLUE, tol=40)
    assert _near(arr[10, 34], RED, tol=40)


# -------------------------------------------------------------------------------------- preprocess
@pytest.mark.parametrize("size", [(97, 61), (61, 97), (50, 50)], ids=["landscape", "portrait", "square"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("input_size", "resize_size"), [((64, 64), 72), ((48, 80), 56)], ids=["square", "wide"])
@pytest.mark.parametrize("api", ["v1", "v2"])
def test_preprocess_matches_torchvision(size, interpolation, input_size, resize_size, api):
    if api == "v2":
        from torchvision.transforms import v2 as T
    else:
        from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    img = _random_rgb(size, seed=sum(size))
    pre = Preprocessing(
        input_size=input_size,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
    reference = T.Compose([T.Resize(resize_size, interpolation=mode), T.CenterCrop(input_size), T.PILToTensor()])
    expected = reference(img)
    got = preprocess_uint8(img, pre)
    assert got.dtype == torch.uint8
    assert got.shape == (3, *input_size)
    assert got.is_contiguous()
    assert torch.equal(got, expected)


def test_preprocess_of_loaded_hostile_images(tmp_path):
    """Whatever load_rgb returns, preprocess_uint8 turns into a [3, H, W] uint8 tensor."""
    pre = Preprocessing(
        input_size=(32, 32), resize_size=36, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    paths = [
        write_cmyk_jpeg(tmp_path / "cmyk.jpg"),
        write_gray16(tmp_path / "g16.png"),
        write_rgba_transparent(tmp_path / "clear.png"),
        write_palette_transparent(tmp_path / "pal.png"),
        write_animation(tmp_path / "anim.gif"),
        write_exif_rotated(tmp_path / "rot.jpg"),
    ]
    for path in paths:
        out = preprocess_uint8(load_rgb(path), pre)
        assert out.shape == (3, 32, 32), path.name
        assert out.dtype == torch.uint8


# ------------------------------------------------------------------------------------- end to end
GOOD = {
    "plain/00_rgb.png": lambda p: make_image(p, seed=1),
    "plain/01_rgb.jpg": lambda p: make_image(p, seed=2),
    "plain/02_grey.png": lambda p: make_image(p, seed=3, mode="L"),
    "plain/03_cmyk.jpg": write_cmyk_jpeg,
    "plain/04_gray16.png": write_gray16,
    "odd/00_rgba.png": write_rgba_transparent,
    "odd/01_palette.png": write_palette_transparent,
    "odd/02_anim.gif": write_animation,
    "odd/03_exif6.jpg": write_exif_rotated,
    "odd/04_exif8.jpg": lambda p: write_exif_rotated(p, 8),
}
# The bad ones sit next to each other, so that (with batch_size=3) one batch holds nothing but failures.
BAD = {
    "zoo/00_empty.jpg": (write_empty, "empty"),
    "zoo/01_truncated.jpg": (write_truncated_jpeg, "truncated"),
    "zoo/02_text.jpg": (write_text, "not an image"),
    "zoo/03_broken_link.jpg": (write_broken_symlink, "symbolic link"),
    "zoo/04_bomb.png": (write_huge_png_header, "decompression-bomb"),
}
LAST_GOOD = "zoo/05_fine.png"


def _build_zoo(root: Path, with_bad: bool = True) -> Path:
    for rel, write in GOOD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
    make_image(root / LAST_GOOD, seed=9)
    if with_bad:
        for rel, (write, _) in BAD.items():
            write(root / rel)
        (root / "zoo" / "06_folder.jpg").mkdir()  # a directory: not an image file, not a row
    return root


@pytest.fixture
def zoo(tmp_path) -> Path:
    return _build_zoo(tmp_path / "zoo")


def _run(source: Path, out: Path, max_failures):
    return extract(source, TINY, out=out, workers=0, progress=False, batch_size=3, max_failures=max_failures)


def test_extract_records_every_hostile_image_and_keeps_the_rest(zoo, tmp_path):
    good_ids = sorted([*GOOD, LAST_GOOD])
    out = tmp_path / "zoo.h5"
    result = _run(zoo, out, max_failures="0")

    assert not result.cached
    assert result.n_images == len(GOOD) + 1 + len(BAD)
    assert result.n_done == len(good_ids)
    assert result.n_failed == len(BAD)
    assert result.too_many_failures
    assert {f.id: f.reason for f in result.failures}.keys() == BAD.keys()

    with featx.store.open(out) as store:
        assert sorted(store.ids()) == good_ids
        assert "zoo/06_folder.jpg" not in store.ids()
        failures = {f.id: f.reason for f in store.failures}
        assert failures.keys() == BAD.keys()
        for rel, (_, expected) in BAD.items():
            assert expected in failures[rel], (rel, failures[rel])
        assert store.info()["failures"] == len(BAD)
        features = store.features()
        assert np.isfinite(features).all()
        assert (np.abs(features).sum(axis=1) > 0).all()
        mixed = dict(zip(store.ids(), features, strict=True))

    # Nothing extracted is lost or disturbed: the good images have the features a clean folder gives.
    clean_out = tmp_path / "clean.h5"
    clean = _run(_build_zoo(tmp_path / "clean", with_bad=False), clean_out, max_failures="0")
    assert clean.n_failed == 0
    assert not clean.too_many_failures
    with featx.store.open(clean_out) as store:
        for row_id, feats in zip(store.ids(), store.features(), strict=True):
            np.testing.assert_allclose(mixed[row_id], feats, rtol=1e-5, atol=1e-5)

    # The threshold is applied again on a cache hit (no model work).
    n = result.n_images
    share = 100 * len(BAD) / n
    for max_failures, too_many in [
        ("inf", False),
        (None, False),
        ("0", True),
        (str(len(BAD)), False),
        (str(len(BAD) - 1), True),
        (f"{share + 1:.1f}%", False),
        (f"{share - 1:.1f}%", True),
        ("100%", False),
    ]:
        again = _run(zoo, out, max_failures=max_failures)
        assert again.cached
        assert again.n_failed == len(BAD)
        assert again.too_many_failures is too_many, max_failures


def test_extract_all_images_failing_still_finishes(tmp_path):
    root = tmp_path / "bad"
    (root / "x").mkdir(parents=True)
    for rel, (write, _) in BAD.items():
        write(root / "x" / Path(rel).name)
    out = tmp_path / "bad.h5"
    result = _run(root, out, max_failures="100%")
    assert result.n_done == 0
    assert result.n_failed == len(BAD)
    assert not result.too_many_failures
    with featx.store.open(out) as store:
        assert len(store.failures) == len(BAD)
        assert store.ids() == []


def test_cli_exit_code_follows_max_failures(zoo, tmp_path, no_store_reuse):
    runner = CliRunner()
    base = ["extract", str(zoo), "--backbone", TINY, "--workers", "0", "--no-progress", "--batch-size", "3"]
    n_images, n_good = len(GOOD) + 1 + len(BAD), len(GOOD) + 1

    strict = runner.invoke(main, [*base, "--max-failures", "0", "--out", str(tmp_path / "strict.h5")])
    assert strict.exit_code == 3, strict.output
    assert f"extracted {n_good} of {n_images} images, {len(BAD)} failed" in strict.stdout
    assert "--max-failures 0" in strict.stderr
    for rel in BAD:
        assert f"failed: {rel}" in strict.stderr

    lenient = runner.invoke(main, [*base, "--max-failures", "inf", "--out", str(tmp_path / "lenient.h5")])
    assert lenient.exit_code == 0, lenient.output
    assert f"extracted {n_good} of {n_images} images, {len(BAD)} failed" in lenient.stdout

    # The same store again: a cache hit, judged by the new threshold.
    cached = runner.invoke(main, [*base, "--max-failures", "0", "--out", str(tmp_path / "lenient.h5")])
    assert cached.exit_code == 3, cached.output
    assert "cache hit" in cached.stdout
    cached_ok = runner.invoke(main, [*base, "--max-failures", "50%", "--out", str(tmp_path / "lenient.h5")])
    assert cached_ok.exit_code == 0, cached_ok.output

    with featx.store.open(tmp_path / "strict.h5") as store:
        assert len(store.ids()) == n_good  # the store is complete although the exit code is 3


def test_cli_rejects_a_bad_max_failures(zoo, tmp_path):
    result = CliRunner().invoke(
        main, ["extract", str(zoo), "--backbone", TINY, "--max-failures", "lots", "--out", str(tmp_path / "x.h5")]
    )
    assert result.exit_code == 2
    assert "max failures" in result.output
    assert not (tmp_path / "x.h5").exists()
