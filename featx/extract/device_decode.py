"""``decode="device"``: JPEGs decoded, resized and centre-cropped in batches on the extraction device.

DataLoader workers only read file bytes (:func:`read_for_device`); the main process decodes a batch of them at
once with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA), resizes (antialiased, the
weights' interpolation) and crops with the same geometry as :func:`~featx.data.imageio.preprocess_uint8`, and
leaves uint8 pixels on the device for the network's normalisation. Everything else takes the exact CPU path
of :func:`~featx.data.imageio.load_for_model`, per image: files that are not plain baseline or progressive
three-channel YCbCr JPEGs (PNGs, CMYK, greyscale, EXIF-rotated, truncated, over ``max_pixels``...), files a
header check cannot vouch for, and any the device decoder rejects. So hostile images fail exactly as with
``exact`` decoding, with the same reasons.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from featx.data.imageio import load_for_model, resized_size
from featx.exceptions import ImageDecodeError
from featx.spec import Preprocessing

__all__ = ["DEVICE_INTERPOLATIONS", "DeviceDecoder", "jpeg_decodable", "read_for_device", "resize_crop"]

log = logging.getLogger(__name__)

#: The interpolations torchvision's antialiased tensor resize shares with Pillow, to a level or two. Weights
#: that ask for another (``lanczos`` has no tensor version; ``nearest-exact`` picks other source pixels than
#: Pillow's ``nearest`` near some rounding boundaries) are decoded on the CPU, exactly.
DEVICE_INTERPOLATIONS = ("bilinear", "bicubic")

_SOF_DECODABLE = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: nvJPEG and libjpeg both
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic
_ORIENTATION = 0x0112


def jpeg_decodable(data: bytes, max_pixels: int, pre: Preprocessing | None = None) -> bool:
    """Whether ``data`` is a complete three-channel YCbCr JPEG, upright, within ``max_pixels`` (and, given the
    preprocessing ``pre``, resized within ``max_pixels`` too: the exact path refuses the rest with its reason).

    A cheap walk over the markers before the scan: anything this cannot vouch for (another format, CMYK,
    greyscale, Adobe RGB, an EXIF orientation other than 1, a missing end marker, a malformed segment) is
    ``False``, and goes the exact way.
    """
    if len(data) < 8 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return False
    frame, adobe_transform, i = None, None, 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if length < 2 or len(segment) != length - 2 or marker in _SOF_OTHER:
            return False
        if marker in _SOF_DECODABLE:
            frame = _frame(segment)
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and _exif_orientation(segment[6:]) not in (None, 1):
            return False
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        i += 2 + length
    if frame is None or adobe_transform not in (None, 1):
        return False
    height, width, ids = frame
    if not (len(ids) == 3 and ids != b"RGB" and 0 < width * height <= max_pixels):
        return False
    if pre is None:
        return True
    new_w, new_h = resized_size(width, height, pre)
    return new_w * new_h <= max_pixels


def _frame(segment: bytes) -> tuple[int, int, bytes] | None:
    """``(height, width, component ids)`` of a start-of-frame segment of 8-bit samples (``None``: another depth)."""
    if len(segment) < 6 or segment[0] != 8:
        return None
    height, width, n = struct.unpack(">HHB", segment[1:6])
    if len(segment) < 6 + 3 * n:
        return None
    return height, width, bytes(segment[6 + 3 * k] for k in range(n))


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 of an EXIF block (``None``: absent); ``-1`` when the block is malformed."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (offset,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[offset : offset + 2])
        for k in range(count):
            entry = tiff[offset + 2 + 12 * k : offset + 14 + 12 * k]
            tag, _, _, value = struct.unpack(order + "HHIH", entry[:10])
            if tag == _ORIENTATION:
                return value
    except (KeyError, struct.error):
        return -1
    return None


def read_for_device(path: str | Path, pre: Preprocessing, max_pixels: int) -> torch.Tensor:
    """What a DataLoader worker hands on: a JPEG's bytes (1-D uint8) or, for any other file, the exact path's
    ``[3, H, W]`` uint8 crop.

    Raises
    ------
    ImageDecodeError
        As :func:`~featx.data.imageio.load_for_model` does, for files the exact path refuses.
    """
    if pre.interpolation in DEVICE_INTERPOLATIONS:
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and 8 <= st.st_size <= 4 * max_pixels + (1 << 20):
                data = Path(path).read_bytes()
                if jpeg_decodable(data, max_pixels, pre):
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        except OSError:
            pass  # the exact path says why, in its own words
    return load_for_model(path, pre, max_pixels)


def resize_crop(images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Resize ``[N, 3, H, W]`` uint8 images of one size and centre-crop them as the exact path does."""
    import torchvision.transforms.v2.functional as tvf
    from torchvision.transforms import InterpolationMode

    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    height, width = images.shape[-2:]
    new_w, new_h = resized_size(width, height, pre)
    if (new_h, new_w) != (height, width):
        images = tvf.resize(images, [new_h, new_w], interpolation=modes[pre.interpolation], antialias=True)
    crop_h, crop_w = pre.input_size
    if crop_w > new_w or crop_h > new_h:  # a crop wider than the image: pad with black, as Pillow's paste does
        pad_h, pad_w = max(crop_h, new_h), max(crop_w, new_w)
        canvas = images.new_zeros((*images.shape[:-2], pad_h, pad_w))
        top, left = (pad_h - new_h) // 2, (pad_w - new_w) // 2
        canvas[..., top : top + new_h, left : left + new_w] = images
        images, new_h, new_w = canvas, pad_h, pad_w
    top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)
    return images[..., top : top + crop_h, left : left + crop_w]


class DeviceDecoder:
    """Turns a batch of JPEG bytes into preprocessed uint8 images on ``device``; what it cannot decode goes the
    exact CPU way, and what that refuses becomes a recorded failure.

    Parameters
    ----------
    paths : sequence of str
        The manifest's paths, by row (for the exact fallback).
    pre : Preprocessing
        The weights' preprocessing.
    device : torch.device
        Where decoding, resizing and cropping run.
    max_pixels : int
        The decompression-bomb guard, for the fallback.
    """

    def __init__(self, paths: Sequence[str], pre: Preprocessing, device: torch.device, max_pixels: int) -> None:
        self.paths, self.pre, self.device, self.max_pixels = paths, pre, device, max_pixels
        self.fallbacks = 0  # images the device decoder rejected, decoded the exact way instead

    def __call__(
        self, rows: Sequence[int], encoded: Sequence[torch.Tensor]
    ) -> tuple[list[int], list[torch.Tensor], list[tuple[int, str]]]:
        """Decode ``encoded`` (the bytes of ``rows``): the rows done, their ``[3, H, W]`` crops, the failures."""
        decoded = self._decode(list(encoded))
        done, crops, failed = [], [], []
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(decoded):
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(k)
        ready: dict[int, torch.Tensor] = {}
        for members in by_size.values():  # one resize for all the images of one size
            batch = resize_crop(torch.stack([decoded[k] for k in members]), self.pre)
            ready.update(zip(members, batch, strict=True))
        for k, row in enumerate(rows):
            if k in ready:
                done.append(int(row))
                crops.append(ready[k])
                continue
            self.fallbacks += 1
            try:
                crops.append(load_for_model(self.paths[row], self.pre, self.max_pixels).to(self.device))
                done.append(int(row))
            except ImageDecodeError as exc:
                failed.append((int(row), str(exc)))
            except Exception as exc:  # as the workers do: one file never kills the job
                failed.append((int(row), f"unexpected {type(exc).__name__}: {exc}"))
        return done, crops, failed

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """All of ``encoded`` in one call; when that fails, one by one, ``None`` for each the decoder rejects."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not encoded:
            return []
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as exc:
                log.debug("device decoder rejected an image (%s); decoding it the exact way", exc)
                out.append(None)
        return out
