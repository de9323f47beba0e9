"""Decoding hostile real-world image files into RGB, and preprocessing them to uint8 tensors.

Every failure becomes an :class:`~featx._errors.ImageDecodeError` whose message is the reason
recorded in the store's failure list, so one bad file never stops a job.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from featx._runtime.env import temporary_attr
from featx.exceptions import ImageDecodeError
from featx.spec import DEFAULT_MAX_PIXELS, Preprocessing

__all__ = ["check_resized_size", "load_for_model", "load_rgb", "preprocess_uint8", "resized_size"]


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


_PILLOW_LIMIT_LOCK = threading.Lock()


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open an image file as an upright 8-bit RGB image.

    Converts CMYK, palette, greyscale and 16-bit images; composites transparency over white; applies
    the EXIF orientation; takes the first frame of animations. ``draft_size`` decodes a JPEG at the
    smallest DCT scale (1/2, 1/4, 1/8) at which both sides are still at least ``draft_size`` pixels
    (libjpeg's reduced decoding; ``max_pixels`` applies to the full size).

    Raises
    ------
    ImageDecodeError
        With a one-line reason: missing, empty, not an image, truncated, too large, unreadable.
    """
    # Pillow's global switch would silently pad truncated files with grey; we want them reported. It is
    # switched off only while featx decodes, so a caller that turned it on finds it on again afterwards.
    with temporary_attr(ImageFile, "LOAD_TRUNCATED_IMAGES", False):
        return _load_rgb(Path(path), max_pixels, draft_size)


def _load_rgb(path: Path, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise ImageDecodeError(f"broken symbolic link (its target {target!r} does not exist)") from None
        raise ImageDecodeError("file not found") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or stream forever
        raise ImageDecodeError("not a regular file (a FIFO, socket or device), not an image file")
    if st.st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _pillow_limit_at_least(max_pixels):
            # Pillow's own warning threshold is fixed; ``max_pixels`` (checked below) is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        f"image is {w}x{h} = {w * h:,} pixels, over the max_pixels limit of {max_pixels:,} "
                        "(decompression-bomb guard); raise max_pixels if you trust the file"
                    )
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                if draft_size and isinstance(img, JpegImageFile):  # MPO (phone photos) included
                    img.draft(None, (draft_size, draft_size))
                img.load()
                # Older Pillow opens 16-bit greyscale PNGs as 32-bit "I": remember they are 16-bit.
                sixteen_bit = img.format == "PNG" and img.mode == "I"
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img, sixteen_bit=sixteen_bit)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image file Pillow can identify (wrong extension or corrupt header)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"image is over the max_pixels limit of {max_pixels:,} (decompression-bomb guard: {exc}); "
            "raise max_pixels if you trust the file"
        ) from None
    except OSError as exc:
        if exc.errno is not None:  # the operating system's error (permissions, I/O), not Pillow's
            raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
        raise ImageDecodeError(_decode_reason(exc)) from None
    except MemoryError:
        raise ImageDecodeError("cannot decode: out of memory") from None
    except Exception as exc:  # corrupt data makes Pillow raise almost anything (struct.error, KeyError...)
        raise ImageDecodeError(_decode_reason(exc)) from None


def _decode_reason(exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    if "truncated" in reason.lower():
        return f"truncated image: {reason}"
    return f"cannot decode: {reason}"


@contextlib.contextmanager
def _pillow_limit_at_least(max_pixels: int) -> Iterator[None]:
    """Lift Pillow's hard decompression-bomb stop (twice ``Image.MAX_IMAGE_PIXELS``) to ``max_pixels``.

    Only when the caller allows more pixels than Pillow would; the global is restored afterwards.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= 2 * limit:
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None:
            Image.MAX_IMAGE_PIXELS = max(limit, max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _to_rgb(img: Image.Image, sixteen_bit: bool = False) -> Image.Image:
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        # Pillow's convert("L") clips 16-bit data at 255; scale the full range down instead.
        arr = np.asarray(img, dtype=np.float64)
        sixteen_bit = sixteen_bit or mode.startswith("I;16")
        top = 65535.0 if sixteen_bit or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.has_transparency_data:
        # Alpha channels, palettes with alpha, transparent colour keys (palette, greyscale, RGB PNGs; GIFs).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def resized_size(width: int, height: int, pre: Preprocessing) -> tuple[int, int]:
    """``(width, height)`` of a ``width`` x ``height`` image once its shorter side is resized to ``pre.resize_size``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = pre.resize_size, int(pre.resize_size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def check_resized_size(width: int, height: int, pre: Preprocessing, max_pixels: int) -> None:
    """Refuse an image whose resized size (shorter side to ``pre.resize_size``) is over ``max_pixels``.

    ``max_pixels`` bounds the decoded image, but resizing the shorter side up multiplies the long one: a
    10000 x 1 strip (110 bytes as a PNG) would become 2,560,000 x 256 pixels, gigabytes of memory, before the
    crop. The same guard bounds the resized image, so no file costs more than ``max_pixels`` at any step.

    Raises
    ------
    ImageDecodeError
        The reason recorded in the store's failure list.
    """
    new_w, new_h = resized_size(width, height, pre)
    if new_w * new_h > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height}: resizing its shorter side to {pre.resize_size} would make it "
            f"{new_w}x{new_h} = {new_w * new_h:,} pixels, over the max_pixels limit of {max_pixels:,} "
            "(an extreme aspect ratio; decompression-bomb guard); crop the image, or raise max_pixels if you "
            "trust the file"
        )


def load_for_model(
    path: str | Path, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS, decode: str = "exact"
) -> torch.Tensor:
    """Decode and preprocess one file the way ``decode`` says (see :class:`~featx.spec.ExtractionSpec`).

    Raises
    ------
    ImageDecodeError
        As :func:`load_rgb` does, and for an image whose resized size is over ``max_pixels``
        (:func:`check_resized_size`), in every decode mode.
    """
    fast = decode == "fast"
    img = load_rgb(path, max_pixels, draft_size=pre.resize_size if fast else None)
    check_resized_size(*img.size, pre, max_pixels)
    return preprocess_uint8(img, pre, crop_region_only=fast)


def preprocess_uint8(img: Image.Image, pre: Preprocessing, crop_region_only: bool = False) -> torch.Tensor:
    """Resize the shorter side to ``pre.resize_size``, centre-crop ``pre.input_size``; ``[3, H, W]`` uint8.

    Mirrors torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images, so normalising the result
    gives exactly what the weights' own transforms give. Normalisation is left to the consumer (it is
    cheaper on the device, from uint8). ``crop_region_only`` resizes just the part of the image the crop
    keeps (Pillow's ``box``): the same sampling positions, about half the work, and a few pixels one
    level apart from the exact path, where Pillow rounds its filter weights differently.
    """
    w, h = img.size
    new_w, new_h = resized_size(w, h, pre)
    crop_h, crop_w = pre.input_size
    if crop_region_only and (new_w, new_h) != (w, h) and crop_w <= new_w and crop_h <= new_h:
        top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        img = img.resize((crop_w, crop_h), resample=_RESAMPLE[pre.interpolation], box=box)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=_RESAMPLE[pre.interpolation])
    if crop_w > new_w or crop_h > new_h:  # only for non-square crops wider than the resized image
        padded = Image.new("RGB", (max(crop_w, new_w), max(crop_h, new_h)))
        padded.paste(img, ((padded.width - new_w) // 2, (padded.height - new_h) // 2))
        img, new_w, new_h = padded, padded.width, padded.height
    top = round((new_h - crop_h) / 2.0)
    left = round((new_w - crop_w) / 2.0)
    img = img.crop((left, top, left + crop_w, top + crop_h))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
