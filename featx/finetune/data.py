"""The images fine-tuning reads: augmented training images, evaluation images, global batches, readability.

Internal to :mod:`featx.finetune`. Augmentation (random resized crop, and flip unless turned off) is drawn per
image from a seed of its own, and the global batches from a seed per epoch, so a run on N ranks, or one resumed
after a kill, sees exactly the images an uninterrupted single-process run sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from featx._runtime import dist as _ddp
from featx.data.imageio import check_resized_size, load_for_model, load_rgb
from featx.data.manifest import Manifest
from featx.spec import Preprocessing

__all__: list[str] = []  # the datasets and samplers are the trainer's own


class _TrainImages(Dataset):
    """Training images with augmentation derived from the backbone's preprocessing: a random resized crop of
    ``scale`` (share of the area), then a random horizontal flip unless ``flip`` is off.

    Items are keyed ``(index, epoch_seed, weight)`` by :class:`_GlobalBatches`. Each image's augmentation is
    drawn from its own generator seeded by ``(epoch_seed, index)``, so it is the same whichever process,
    DataLoader worker or rank loads it: a run on N ranks sees exactly the images a run on one process sees.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray,
        pre: Preprocessing,
        scale: tuple[float, float],
        max_pixels: int,
        *,
        flip: bool = True,
    ) -> None:
        from torchvision.transforms import InterpolationMode, RandomHorizontalFlip, RandomResizedCrop

        self.paths, self.labels, self.max_pixels = list(paths), labels, max_pixels
        self.crop = RandomResizedCrop(pre.input_size, scale=scale, interpolation=InterpolationMode(pre.interpolation))
        self.flip = RandomHorizontalFlip() if flip else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, float]):
        i, epoch_seed, weight = key
        image = load_rgb(self.paths[i], self.max_pixels)
        # torchvision's transforms draw from the global generator; fork it so the image's own seed rules.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(epoch_seed, i))
            img = self.crop(image)
            if self.flip is not None:  # drawn after the crop: with or without it, the crops are the same
                img = self.flip(img)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels, int(self.labels[i]), float(weight)


def _sample_seed(epoch_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(1)[0])


class _GlobalBatches:
    """One epoch's batches for one rank: the global order is a seeded permutation, each global batch of
    ``batch_size`` images is split across the ranks in contiguous parts.

    The global batches are the ones a single process would train on, so with gradients averaged over the
    ranks (and each image's loss weighted by ``world / len(global batch)``) every step sees the same gradient
    as a single process, whatever the number of ranks. A rank whose part of a short last batch is empty gets
    one image with weight 0, because every rank must run each step's forward and backward pass.
    """

    def __init__(self, n: int, batch_size: int, epoch_seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.epoch_seed, self.rank, self.world = n, batch_size, epoch_seed, rank, world

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch_seed)).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            weight = self.world / len(batch)
            part = np.array_split(np.array(batch), self.world)[self.rank]
            if len(part):
                yield [(int(i), self.epoch_seed, weight) for i in part]
            else:
                yield [(batch[0], self.epoch_seed, 0.0)]


class _EvalImages(Dataset):
    """Evaluation images with exactly the extraction preprocessing (resize, centre crop)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, pre: Preprocessing, max_pixels: int) -> None:
        self.paths, self.labels, self.pre, self.max_pixels = list(paths), labels, pre, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_for_model(self.paths[i], self.pre, self.max_pixels), int(self.labels[i])


def _readable(
    manifest: Manifest, rows: np.ndarray, max_pixels: int, pre: Preprocessing
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Rows whose images decode, and (id, reason) of those that do not (checked once, up front), evaluation's
    resized size included (:func:`~featx.data.imageio.check_resized_size`)."""
    from featx.exceptions import ImageDecodeError

    ok, bad = [], []
    for r in rows:
        try:
            check_resized_size(*load_rgb(manifest.paths[r], max_pixels).size, pre, max_pixels)
            ok.append(r)
        except ImageDecodeError as exc:
            bad.append((manifest.ids[r], str(exc)))
    return np.array(ok, dtype=np.int64), bad


def _readable_sharded(
    manifest: Manifest, rows: np.ndarray, max_pixels: int, pre: Preprocessing, world: _ddp.World
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """:func:`_readable`, each rank decoding its share of the images once."""
    parts = _ddp.gather_objects(world, _readable(manifest, rows[world.rank :: world.size], max_pixels, pre))
    if len(parts) == 1:
        return parts[0]
    reasons = dict(b for _, part in parts for b in part)
    ok = np.array([r for r in rows if manifest.ids[r] not in reasons], dtype=np.int64)
    return ok, [(manifest.ids[r], reasons[manifest.ids[r]]) for r in rows if manifest.ids[r] in reasons]
