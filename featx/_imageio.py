"""Decoding hostile real-world image files into RGB, and preprocessing them to uint8 tensors.

Every failure becomes an :class:`~featx._errors.ImageDecodeError` whose message is the reason
recorded in the store's failure list, so one bad file never stops a job.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featx._errors import ImageDecodeError
from featx.spec import Preprocessing

__all__ = ["DEFAULT_MAX_PIXELS", "load_rgb", "preprocess_uint8"]

#: Images above this many pixels are refused before decoding (decompression-bomb guard, ~89 Mpx as Pillow).
DEFAULT_MAX_PIXELS = 89_478_485

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright 8-bit RGB image.

    Converts CMYK, palette, greyscale and 16-bit images; composites transparency over white; applies
    the EXIF orientation; takes the first frame of animations.

    Raises
    ------
    ImageDecodeError
        With a one-line reason: missing, empty, not an image, truncated, too large, unreadable.
    """
    path = Path(path)
    # Pillow's global switch would silently pad truncated files with grey; we want them reported.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    if path.is_dir():
        raise ImageDecodeError("is a directory, not an image file")
    if size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        f"image is {w}x{h} = {w * h / 1e6:.0f} Mpx, over the {max_pixels / 1e6:.0f} Mpx limit "
                        "(decompression-bomb guard); raise max_pixels if you trust the file"
                    )
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image file Pillow can identify (wrong extension or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression-bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason:
            raise ImageDecodeError(f"truncated image: {reason}") from None
        raise ImageDecodeError(f"cannot decode: {reason}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's convert("L") clips 16-bit data at 255; scale the full range down instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_uint8(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Resize the shorter side to ``pre.resize_size``, centre-crop ``pre.input_size``; ``[3, H, W]`` uint8.

    Mirrors torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images, so normalising the result
    gives exactly what the weights' own transforms give. Normalisation is left to the consumer (it is
    cheaper on the device, from uint8).
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.resize_size, int(pre.resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=_RESAMPLE[pre.interpolation])
    crop_h, crop_w = pre.input_size
    if crop_w > new_w or crop_h > new_h:  # only for non-square crops wider than the resized image
        padded = Image.new("RGB", (max(crop_w, new_w), max(crop_h, new_h)))
        padded.paste(img, ((padded.width - new_w) // 2, (padded.height - new_h) // 2))
        img, new_w, new_h = padded, padded.width, padded.height
    top = round((new_h - crop_h) / 2.0)
    left = round((new_w - crop_w) / 2.0)
    img = img.crop((left, top, left + crop_w, top + crop_h))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
