"""The no-transfer baseline: ``featx:pixels`` and ``featx:pixels32``, the image's own pixels as its features.

The image goes through the same resize, centre crop and normalisation as any backbone's input, at a small
fixed size, and is flattened: channel-major (every red pixel row by row, then green, then blue), so a store
of ``featx:pixels`` holds ``3 × 16 × 16 = 768`` values per image, ``featx:pixels32`` ``3 × 32 × 32 = 3072``.
A classifier trained on them (``featx train STORE -c logreg``) is the row that shows what transfer buys: a
pretrained backbone that does not beat it has learned nothing useful for the task.

The network has no weights (its checksum is the SHA-256 of nothing, so its spec and cache key are defined
like any other's) and no classifier, so it cannot be fine-tuned (:class:`~featx.backbones.features.Headless`).

Examples
--------
>>> from featx.backbones import load_backbone
>>> net = load_backbone("featx:pixels")
>>> net.preprocessing.input_size, net.weights
((16, 16), 'none (raw pixels)')
"""

from __future__ import annotations

from torch import Tensor, nn

from featx.backbones.features import Headless
from featx.backbones.names import register_backbone
from featx.spec import Preprocessing

__all__ = ["PIXELS_WEIGHTS", "RawPixels", "pixels_preprocessing"]


#: The weights tag recorded in a pixels store's spec: there are none.
PIXELS_WEIGHTS = "none (raw pixels)"

# The baseline's preprocessing constants live here and nowhere else. The shorter side is resized to the crop
# size (the crop keeps the whole of a square image); mean = std = 0.5 maps [0, 1] to [-1, 1], as Lite0 does.
# Bicubic, as Lite0 (Pillow antialiases it when shrinking). Logreg on the quickstart's digits, default split plan,
# 359 test images: bicubic 0.9666, nearest 0.9610, bilinear 0.9582, all inside one 95 % CI (about ±0.02).
_INTERPOLATION = "bicubic"
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


def pixels_preprocessing(size: int) -> Preprocessing:
    """The preprocessing of a raw-pixels baseline: shorter side to ``size``, centre crop ``size × size``.

    Parameters
    ----------
    size : int
        Side of the square the image becomes (16 for ``featx:pixels``, 32 for ``featx:pixels32``).

    Returns
    -------
    Preprocessing
        Bicubic resize, mean = std = 0.5.
    """
    return Preprocessing(input_size=(size, size), resize_size=size, interpolation=_INTERPOLATION, mean=_MEAN, std=_STD)


class RawPixels(Headless):
    """The normalised input image flattened to one vector per image: ``[N, 3, H, W]`` → ``[N, 3·H·W]``.

    It holds no parameters and no buffers. Its one FX node, ``flatten``, is the ``penultimate`` layer.
    """

    penultimate: str = "flatten"
    no_classifier: str = (
        "it is the raw pixels of the resized image, with no learned weights and no classifier to replace, "
        "so there is nothing to fine-tune"
    )

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(x)


def _pixels(size: int):
    def factory() -> tuple[nn.Module, Preprocessing, str]:
        return RawPixels(), pixels_preprocessing(size), PIXELS_WEIGHTS

    return factory


register_backbone(
    "pixels",
    _pixels(16),
    "no-transfer baseline: the image resized and centre-cropped to 16x16 RGB, flattened; 768-d, no weights",
    trainable=False,
)
register_backbone(
    "pixels32",
    _pixels(32),
    "no-transfer baseline: the image resized and centre-cropped to 32x32 RGB, flattened; 3072-d, no weights",
    trainable=False,
)
