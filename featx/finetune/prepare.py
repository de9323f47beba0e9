"""The inputs of a fine-tuning run: its rows by split, the backbone with its new head, and the shared setup.

Internal to :mod:`featx.finetune`: the first steps of :func:`featx.finetune.trainer.finetune`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featx._runtime import dist as _ddp
from featx._runtime.device import channels_last_pays
from featx._runtime.env import default_workers
from featx.backbones.features import Backbone
from featx.backbones.loading import load_backbone
from featx.backbones.names import BackboneName
from featx.data.manifest import Manifest
from featx.data.sources import load_source
from featx.data.splits import SplitPlan, split_hashes
from featx.exceptions import UnknownNameError
from featx.finetune.config import FinetuneConfig
from featx.finetune.data import EvalImages, TrainImages, readable_sharded
from featx.finetune.heads import ClassifierNet, block_names, build_head, head_from_logreg, set_module
from featx.spec import Preprocessing

__all__ = ["build_model", "load_manifest", "prepare_rows"]

log = logging.getLogger("featx.finetune.trainer")  # one logger for the run's story


@dataclass
class Rows:
    """The manifest's rows by split, unreadable images dropped, and how the val rows were chosen."""

    manifest: Manifest
    fingerprint: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_policy: str
    skipped: list[tuple[str, str]]
    plan: SplitPlan
    split_hashes: dict[str, str]


@dataclass
class _Built:
    """The backbone with its new head in place (on the CPU), and what was swapped in."""

    net: Backbone  # net.parsed: its resolved BackboneName
    blocks: list[list[str]]
    head_name: str
    init_ref: str | None  # the LP-FT model file, resolved


def load_manifest(source: str | Path | Manifest, plan: SplitPlan | None) -> Manifest:
    """The source's manifest with the splits of ``plan`` (what the source lacks carved; a manifest that has
    train, val and test keeps them), refused when its training split has fewer than two classes."""
    manifest = (source if isinstance(source, Manifest) else load_source(source)).with_plan(plan)
    labelled_train = np.flatnonzero(np.array([s == "train" for s in manifest.splits]))
    if len(np.unique(manifest.labels[labelled_train])) < 2:
        raise ValueError(f"{manifest.source} has fewer than two classes in its training split; nothing to fine-tune")
    return manifest


def build_model(
    name: BackboneName,
    manifest: Manifest,
    config: FinetuneConfig,
    *,
    init_head: str | Path | None,
    trust: bool,
    probe_on: tuple[str, ...] = ("train",),
) -> _Built:
    """Load the backbone, check the phases fit it, and swap its classifier for a new head (every
    parameter trainable; the phases freeze them). The head's initial weights follow ``config.seed``, or
    an LP-FT probe's, which must have been fit on the splits ``probe_on``."""
    net = load_backbone(name)
    blocks = block_names(net)
    for phase in config.phases:
        if phase.freeze.startswith("top") and int(phase.freeze[3:]) > len(blocks):
            raise UnknownNameError(
                f"phase {phase.freeze}: {net.name} has {len(blocks)} blocks, so use top1 … top{len(blocks)} or all"
            )
    head_name = net.classifier_name()
    old_head = net.model.get_submodule(head_name)
    if not isinstance(old_head, nn.Linear):
        raise ValueError(
            f"{net.name} ends in a {type(old_head).__name__}, not a Linear classifier; featx fine-tunes "
            "networks with a linear head"
        )
    with torch.random.fork_rng():  # the new head's initial weights follow the seed, nothing else's RNG
        torch.manual_seed(config.seed)
        head = build_head(old_head.in_features, len(manifest.class_names), config.hidden, config.dropout)
    init_ref = None
    if init_head is not None:
        if config.hidden:
            raise ValueError("--init-head sets a linear head; it cannot be combined with an MLP head (--hidden)")
        hashes = split_hashes(manifest.ids, manifest.splits)
        W, b = head_from_logreg(
            init_head,
            net,
            manifest.class_names,
            trust=trust,
            split_hashes=hashes,
            fitted_on=probe_on,
            scale_floor=config.probe_scale_floor,
        )
        linear = head if isinstance(head, nn.Linear) else head[-1]
        with torch.no_grad():
            linear.weight.copy_(W)
            linear.bias.copy_(b)
        init_ref = str(Path(init_head).resolve())
    set_module(net.model, head_name, head)
    for p in net.model.parameters():
        p.requires_grad_(True)
    return _Built(net, blocks, head_name, init_ref)


def prepare_rows(world: _ddp.World, manifest: Manifest, plan: SplitPlan, max_pixels: int, pre: Preprocessing) -> Rows:
    """Train, val and test rows of a planned manifest (:func:`load_manifest`), each image decoded once (shared
    out over the ranks); unreadable ones, and those the preprocessing ``pre`` would resize past ``max_pixels``,
    are skipped with a warning."""
    fp = manifest.fingerprint()
    if len(set(_ddp.gather_objects(world, fp))) > 1:
        raise RuntimeError(
            f"the ranks see different data at {manifest.source} (manifest fingerprints differ); every node "
            "must see the same files: put the dataset on a shared filesystem or copy it identically"
        )
    splits = np.array(manifest.splits)
    train_rows, val_rows = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    if not len(val_rows):
        raise ValueError(
            f"{manifest.source} has no val images to choose the epoch on (every class has a single training "
            "image); add images"
        )
    val_policy = manifest.split_policy
    test_rows = np.flatnonzero(splits == "test")
    train_rows, bad_train = readable_sharded(manifest, train_rows, max_pixels, pre, world)
    val_rows, bad_val = readable_sharded(manifest, val_rows, max_pixels, pre, world)
    test_rows, bad_test = readable_sharded(manifest, test_rows, max_pixels, pre, world)
    skipped = bad_train + bad_val + bad_test
    if world.is_main:
        for image_id, reason in skipped:
            log.warning("skipping unreadable image %s: %s", image_id, reason)
    return Rows(
        manifest, fp, train_rows, val_rows, test_rows, val_policy, skipped, plan, split_hashes(manifest.ids, splits)
    )


@dataclass
class Run:
    """What every step of one run shares: where it runs, its settings, the model and the images."""

    world: _ddp.World
    dev: torch.device
    config: FinetuneConfig
    amp: str
    out: Path
    rows: Rows
    built: _Built
    model: ClassifierNet
    channels_last: bool
    loader_kw: dict[str, Any]
    max_pixels: int
    train_set: TrainImages
    val_images: EvalImages
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    info: Callable[..., None]
    progress: bool = False  # show progress (rank 0 only)

    @classmethod
    def start(
        cls,
        world: _ddp.World,
        dev: torch.device,
        config: FinetuneConfig,
        amp: str,
        out: Path,
        rows: Rows,
        built: _Built,
        *,
        workers: int | None,
        max_pixels: int,
        progress: bool = False,
    ) -> Run:
        """Put the model on its device (SyncBatchNorm when BatchNorm statistics train over several GPUs)
        and set up the training and validation images."""
        net, pre = built.net, built.net.preprocessing
        if world.distributed and config.update_bn_stats:
            if dev.type == "cuda":  # batch statistics over the global batch, as on one GPU
                net.model = nn.SyncBatchNorm.convert_sync_batchnorm(net.model)
            elif world.is_main:
                warnings.warn(
                    "update_bn_stats under gloo: BatchNorm statistics come from each rank's part of the batch "
                    "(SyncBatchNorm needs CUDA), so the run will not match a single-process one",
                    stacklevel=4,
                )
        model = ClassifierNet(net.model, pre).to(dev)
        channels_last = channels_last_pays(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        workers = default_workers() if workers is None else workers
        paths, labels = rows.manifest.paths, rows.manifest.labels
        return cls(
            world=world,
            dev=dev,
            config=config,
            amp=amp,
            out=out,
            rows=rows,
            built=built,
            model=model,
            channels_last=channels_last,
            loader_kw={"num_workers": workers, "pin_memory": dev.type == "cuda", "persistent_workers": False},
            max_pixels=max_pixels,
            train_set=TrainImages(
                [paths[r] for r in rows.train], labels[rows.train], pre, config.crop_scale, max_pixels, flip=config.flip
            ),
            val_images=EvalImages([paths[r] for r in rows.val], labels[rows.val], pre, max_pixels),
            criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, reduction="none"),
            scaler=torch.amp.GradScaler(dev.type, enabled=amp == "fp16"),
            steps_per_epoch=max(1, math.ceil(len(rows.train) / config.batch_size)),
            info=log.info if world.is_main else log.debug,  # one story in the log, not one per rank
            progress=progress and world.is_main,
        )
