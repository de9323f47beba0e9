"""Fine-tuning f end to end: new head, freezing schedules, phased learning rates, LP-FT, resumable.

The classic recipe, on the same manifest and test split as the frozen-feature classifiers: train only a
new head, then unfreeze the top blocks with a smaller learning rate, then everything with a smaller one
still. Each phase warms up linearly then decays with a cosine. Frozen blocks keep their BatchNorm layers
in eval mode, so their running statistics never move. A checkpoint is written after every epoch; a job
killed at any moment resumes from it and reaches the same weights as an uninterrupted run with the seed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from featx import _ddp
from featx._env import default_workers, library_versions
from featx._errors import SpecMismatchError, UnknownNameError
from featx._imageio import load_for_model, load_rgb
from featx._malloc import reuse_freed_memory
from featx.backbones import Backbone, channels_last_pays, load_backbone, resolve_backbone
from featx.data import Manifest, load_source
from featx.extract import _resolve_amp, resolve_device
from featx.metrics import evaluate
from featx.spec import DEFAULT_MAX_PIXELS, Preprocessing, canonical_json

__all__ = [
    "DEFAULT_PHASES",
    "FinetuneConfig",
    "Phase",
    "block_names",
    "finetune",
    "head_from_logreg",
    "load_finetuned",
    "parse_phases",
]

log = logging.getLogger(__name__)

#: The classic recipe: the head alone, then the top two blocks, then everything, each at a tenth of the rate.
DEFAULT_PHASES = "head:3:1e-3,top2:5:1e-4,all:5:1e-5"
CHECKPOINT = "checkpoint.pt"
FINETUNE_META = "finetune.json"
WEIGHTS = "model.safetensors"
_PHASE_RE = re.compile(r"^(head|all|top(\d+)):(\d+):([0-9.eE+-]+)$")


# ------------------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class Phase:
    """One training phase: what is trainable, for how many epochs, at which peak learning rate.

    ``freeze`` is ``head`` (only the new head trains), ``topK`` (the last K backbone blocks and the head)
    or ``all`` (everything trains).
    """

    freeze: str
    epochs: int
    lr: float

    def __post_init__(self) -> None:
        if not (self.freeze in ("head", "all") or re.fullmatch(r"top[1-9]\d*", self.freeze)):
            raise ValueError(f"phase freezing {self.freeze!r}: use head, topK (e.g. top2) or all")
        if self.epochs < 1:
            raise ValueError(f"phase {self.freeze} needs at least one epoch, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"phase {self.freeze} needs a positive learning rate, got {self.lr}")

    @property
    def label(self) -> str:
        return self.freeze


def parse_phases(spec: str | Path) -> list[Phase]:
    """``"head:3:1e-3,top2:5:1e-4,all:5:1e-5"`` (FREEZE:EPOCHS:LR, comma-separated) or a TOML file.

    A TOML file holds ``[[phase]]`` tables with ``freeze``, ``epochs`` and ``lr``.
    """
    text = str(spec)
    path = Path(text)
    if path.suffix == ".toml":
        if not path.is_file():
            raise FileNotFoundError(f"phases file {text!r} does not exist")
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        tables = data.get("phase")
        if not isinstance(tables, list) or not tables:
            raise ValueError(f"{text}: expected [[phase]] tables with freeze, epochs and lr")
        phases = []
        for i, table in enumerate(tables, 1):
            extra = set(table) - {"freeze", "epochs", "lr"}
            if extra or not {"freeze", "epochs", "lr"} <= set(table):
                raise ValueError(f"{text}: phase {i} must have exactly freeze, epochs and lr (got {sorted(table)})")
            phases.append(Phase(str(table["freeze"]), int(table["epochs"]), float(table["lr"])))
        return phases
    phases = []
    for part in (p.strip() for p in text.split(",")):
        m = _PHASE_RE.match(part)
        if not m:
            raise ValueError(
                f"phase {part!r} is not FREEZE:EPOCHS:LR (FREEZE = head, topK or all), "
                'e.g. "head:3:1e-3,top2:5:1e-4,all:5:1e-5"'
            )
        try:
            lr = float(m.group(4))
        except ValueError:
            raise ValueError(f"phase {part!r}: {m.group(4)!r} is not a learning rate") from None
        phases.append(Phase(m.group(1), int(m.group(3)), lr))
    return phases


# ------------------------------------------------------------------------------------------ blocks
def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Containers that hold a network's stages (torchvision: features, trunk_output, encoder.layers).
_TRUNK_CONTAINERS = ("features", "trunk_output", "encoder", "layers", "blocks", "stages")


def _generic_blocks(model: nn.Module, head: str) -> list[list[str]]:
    """Blocks of a network without timm metadata: its top-level children in order, descending into the
    trunk container that holds most of the parameters (``features``, ``encoder.layers``, …) and into the
    container that holds the head (VGG's ``classifier``: fc6 and fc7 are blocks)."""
    total = _n_params(model)
    blocks: list[list[str]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == head or _n_params(child) == 0:
                continue
            holds_head = head.startswith(full + ".")
            trunk = name in _TRUNK_CONTAINERS and _n_params(child) > 0.5 * total
            if list(child.children()) and (holds_head or trunk):
                visit(full + ".", child)
            else:
                blocks.append([n for n, _ in child.named_parameters(prefix=full)])

    visit("", model)
    return blocks


def block_names(backbone: Backbone) -> list[list[str]]:
    """The backbone's blocks, input to output, each a list of parameter names (the head excluded).

    timm models (and the built-in) use timm's own coarse group matcher (stem, then stages); others are
    split at their top-level children (see :func:`_generic_blocks`).
    """
    model = backbone.model
    head = backbone.classifier_name()
    if hasattr(model, "group_matcher"):
        from timm.models._manipulate import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        blocks = [
            [n for n in names if not (n == head or n.startswith(head + "."))] for _, names in sorted(groups.items())
        ]
        return [b for b in blocks if b]
    return _generic_blocks(model, head)


# -------------------------------------------------------------------------------------------- heads
def _build_head(in_features: int, n_classes: int, hidden: Sequence[int], dropout: float) -> nn.Module:
    if not hidden:
        return (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, n_classes))
            if dropout
            else nn.Linear(in_features, n_classes)
        )
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def head_from_logreg(
    model_file: str | Path, backbone: Backbone, class_names: Sequence[str], trust: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a linear head equal to a stage-2 logistic regression (LP-FT, Kumar et al. 2022).

    The logistic regression must be trained on this backbone's ``penultimate`` features with ``standard``
    or no preprocessing: standardisation is folded into the weights, so ``head(x)`` equals the regression's
    decision function on the raw features exactly (up to float rounding).
    """
    from featx.classify import load_model

    trained = load_model(model_file, trust=trust)
    spec = trained.meta["store_spec"]
    if spec["backbone"] != backbone.name or spec["weights_sha256"] != backbone.weights_sha256:
        raise SpecMismatchError(
            f"--init-head model was trained on features of {spec['backbone']} (weights {spec['weights_sha256'][:12]}), "
            f"not {backbone.name} (weights {backbone.weights_sha256[:12]}); train it on a store of this backbone"
        )
    if trained.layer != "penultimate" or spec.get("pool") not in ("avg", None):
        raise ValueError("--init-head needs a model trained on the 'penultimate' layer with avg pooling")
    if list(trained.class_names) != list(class_names):
        raise SpecMismatchError(
            f"--init-head model's classes {trained.class_names} differ from the data's {list(class_names)}"
        )
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    steps = trained.pipeline.steps
    clf = steps[-1][1]
    if not isinstance(clf, LogisticRegression):
        raise ValueError(f"--init-head needs a logistic regression (featx train -c logreg), not {type(clf).__name__}")
    W = np.asarray(clf.coef_, dtype=np.float64)
    b = np.asarray(clf.intercept_, dtype=np.float64)
    for name, step in reversed(steps[:-1]):
        if isinstance(step, StandardScaler):
            scale = step.scale_ if step.scale_ is not None else np.ones(W.shape[1])
            mean = step.mean_ if step.mean_ is not None else np.zeros(W.shape[1])
            b = b - (W / scale) @ mean
            W = W / scale
        else:
            raise ValueError(
                f"--init-head: the logistic regression uses preprocessing {name!r}, which cannot be folded into a "
                "linear head; train it with --preprocess standard (the default) or none"
            )
    n = len(class_names)
    if W.shape[0] == 1 and n == 2:  # binary: softmax([0, z]) = sigmoid(z)
        W = np.vstack([np.zeros_like(W), W])
        b = np.concatenate([[0.0], b])
    full_W = np.zeros((n, W.shape[1]))
    full_b = np.full(n, -1e4)  # classes the regression never saw stay improbable
    full_W[clf.classes_] = W
    full_b[clf.classes_] = b
    return torch.tensor(full_W, dtype=torch.float32), torch.tensor(full_b, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (its hash guards resuming).

    Parameters
    ----------
    phases : tuple of Phase
    batch_size : int, default=32
    optimizer : {"sgd", "adamw"}, default="sgd"
        SGD with momentum 0.9 (Nesterov), or AdamW.
    weight_decay : float, default=1e-4
        Not applied to biases and normalisation parameters.
    label_smoothing : float, default=0.0
    clip_grad : float, default=0.0
        Max gradient norm; 0 disables clipping.
    backbone_lr_mult : float, default=1.0
        The backbone's learning rate relative to the head's.
    warmup : float, default=0.1
        Share of each phase's steps spent warming up linearly.
    hidden : tuple of int, default=()
        Hidden sizes of an MLP head; empty for a linear head.
    dropout : float, default=0.0
    crop_scale : tuple of float, default=(0.25, 1.0)
        Area range of the random resized crop.
    patience : int, optional
        End a phase after this many epochs without improving the monitored metric.
    metric : {"val_accuracy", "val_loss"}, default="val_accuracy"
    val_fraction : float, default=0.1
        Share of train carved off (seeded, stratified) for validation when the source has no val split.
    seed : int, default=0
    update_bn_stats : bool, default=False
        Let unfrozen BatchNorm layers update their running statistics. Off by default, as the Keras
        transfer-learning guide advises: on small or shifted data, batch statistics drift and wreck the
        pretrained features (LP-FT on digits fell from 0.96 to 0.28 with them on).
    """

    phases: tuple[Phase, ...]
    batch_size: int = 32
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    clip_grad: float = 0.0
    backbone_lr_mult: float = 1.0
    warmup: float = 0.1
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    crop_scale: tuple[float, float] = (0.25, 1.0)
    patience: int | None = None
    metric: str = "val_accuracy"
    val_fraction: float = 0.1
    seed: int = 0
    update_bn_stats: bool = False

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("fine-tuning needs at least one phase")
        checks = [
            (self.batch_size >= 1, f"batch size must be positive, got {self.batch_size}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer {self.optimizer!r}: use sgd or adamw"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (self.clip_grad >= 0, "gradient clipping must be >= 0 (0 = off)"),
            (self.backbone_lr_mult > 0, "the backbone learning-rate multiplier must be positive"),
            (0 <= self.warmup < 1, "warm-up must be a share of each phase's steps, in [0, 1)"),
            (all(h >= 1 for h in self.hidden), "hidden sizes must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop scale must satisfy 0 < min <= max <= 1"),
            (self.patience is None or self.patience >= 1, "patience must be at least 1 epoch"),
            (self.metric in ("val_accuracy", "val_loss"), f"metric {self.metric!r}: use val_accuracy or val_loss"),
            (0 < self.val_fraction < 1, "val fraction must be in (0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["phases"] = [dataclasses.asdict(p) for p in self.phases]
        return json.loads(canonical_json(d))

    @property
    def label(self) -> str:
        return "→".join(p.label for p in self.phases)


# ------------------------------------------------------------------------------------------- model
class _Classifier(nn.Module):
    """The backbone with its new head, plus on-device normalisation from uint8 pixels."""

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.net = model
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)


class _TrainImages(Dataset):
    """Training images with augmentation derived from the backbone's preprocessing (random resized crop, flip).

    Items are keyed ``(index, epoch_seed, weight)`` by :class:`_GlobalBatches`. Each image's augmentation is
    drawn from its own generator seeded by ``(epoch_seed, index)``, so it is the same whichever process,
    DataLoader worker or rank loads it: a run on N ranks sees exactly the images a run on one process sees.
    """

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, pre: Preprocessing, scale: tuple[float, float], max_pixels: int
    ) -> None:
        from torchvision.transforms import InterpolationMode, RandomHorizontalFlip, RandomResizedCrop

        self.paths, self.labels, self.max_pixels = list(paths), labels, max_pixels
        self.crop = RandomResizedCrop(pre.input_size, scale=scale, interpolation=InterpolationMode(pre.interpolation))
        self.flip = RandomHorizontalFlip()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, float]):
        i, epoch_seed, weight = key
        image = load_rgb(self.paths[i], self.max_pixels)
        # torchvision's transforms draw from the global generator; fork it so the image's own seed rules.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(epoch_seed, i))
            img = self.flip(self.crop(image))
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


def _readable(manifest: Manifest, rows: np.ndarray, max_pixels: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Rows whose images decode, and (id, reason) of those that do not (checked once, up front)."""
    from featx._errors import ImageDecodeError

    ok, bad = [], []
    for r in rows:
        try:
            load_rgb(manifest.paths[r], max_pixels)
            ok.append(r)
        except ImageDecodeError as exc:
            bad.append((manifest.ids[r], str(exc)))
    return np.array(ok, dtype=np.int64), bad


def _carve_val(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        if len(members) >= 2:
            val += list(rng.permutation(members)[: max(1, round(fraction * len(members)))])
    val_rows = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(rows, val_rows), val_rows


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _set_trainable(model: nn.Module, blocks: list[list[str]], head: str, phase: Phase) -> set[str]:
    """Freeze everything but what the phase trains; returns the trainable parameter names."""
    if phase.freeze == "all":
        trainable = {n for n, _ in model.named_parameters()}
    else:
        k = 0 if phase.freeze == "head" else int(phase.freeze[3:])
        if k > len(blocks):
            raise UnknownNameError(
                f"phase {phase.freeze}: this backbone has only {len(blocks)} blocks (top1 … top{len(blocks)})"
            )
        trainable = {n for block in blocks[len(blocks) - k :] for n in block} if k else set()
        trainable |= {n for n, _ in model.named_parameters() if n == head or n.startswith(head + ".")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return trainable


def _train_mode(model: nn.Module, update_bn_stats: bool = False) -> None:
    """Train mode, except BatchNorm layers: frozen ones always keep their statistics, trainable ones too
    unless ``update_bn_stats`` (their affine parameters still train either way)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
            params = list(module.parameters(recurse=False))
            frozen = params and not any(p.requires_grad for p in params)
            if frozen or (isinstance(module, nn.modules.batchnorm._BatchNorm) and not update_bn_stats):
                module.eval()


def _optimizer(model: nn.Module, head: str, config: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name == head or name.startswith(head + ".")
        no_decay = p.ndim <= 1  # biases and normalisation parameters
        groups.setdefault((is_head, no_decay), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": lr if is_head else lr * config.backbone_lr_mult,
            "weight_decay": 0.0 if no_decay else config.weight_decay,
            "featx_group": f"{'head' if is_head else 'backbone'}",
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=lr)


# ------------------------------------------------------------------------------------------- run
def _config_hash(config: FinetuneConfig, backbone: Backbone, manifest_fp: str, init_head: str | None) -> str:
    payload = canonical_json(
        {
            "config": config.to_dict(),
            "backbone": backbone.name,
            "weights": backbone.weights_sha256,
            "manifest": manifest_fp,
            "init_head": init_head,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@torch.inference_mode()
def _predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: str, n_classes: int) -> tuple:
    """Scores, labels and the summed cross-entropy of everything in ``loader``."""
    model.eval()
    logits, labels, loss_sum = [], [], 0.0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if channels_last_pays(device):
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(out, y.to(device), reduction="sum").item())
        logits.append(out.cpu())
        labels.append(y)
    if not logits:  # this rank's shard is empty
        return np.zeros((0, n_classes), dtype=np.float32), np.zeros(0, dtype=np.int64), 0.0
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), loss_sum


def _predict_rows(
    model: nn.Module,
    images: _EvalImages,
    world: _ddp.World,
    *,
    batch_size: int,
    loader_kw: dict[str, Any],
    device: torch.device,
    amp: str,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores and labels of every image, in order, on every rank, and the mean loss.

    Each rank predicts every ``world.size``-th image (no padding, so no image counts twice); the parts
    are gathered and put back in order, so the metrics equal a single process's.
    """
    mine = np.arange(len(images))[world.rank :: world.size]
    loader = DataLoader(Subset(images, mine.tolist()), batch_size=batch_size, shuffle=False, **loader_kw)
    scores, y, loss_sum = _predict(model, loader, device, amp, n_classes)
    parts = _ddp.gather_objects(world, (mine, scores, y, loss_sum))
    if len(parts) == 1:
        return scores, y, loss_sum / max(1, len(y))
    order = np.concatenate([p[0] for p in parts])
    all_scores = np.zeros((len(images), n_classes), dtype=np.float32)
    all_y = np.zeros(len(images), dtype=np.int64)
    all_scores[order] = np.concatenate([p[1] for p in parts])
    all_y[order] = np.concatenate([p[2] for p in parts])
    return all_scores, all_y, sum(p[3] for p in parts) / max(1, len(images))


def _readable_sharded(
    manifest: Manifest, rows: np.ndarray, max_pixels: int, world: _ddp.World
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """:func:`_readable`, each rank decoding its share of the images once."""
    parts = _ddp.gather_objects(world, _readable(manifest, rows[world.rank :: world.size], max_pixels))
    if len(parts) == 1:
        return parts[0]
    reasons = dict(b for _, part in parts for b in part)
    ok = np.array([r for r in rows if manifest.ids[r] not in reasons], dtype=np.int64)
    return ok, [(manifest.ids[r], reasons[manifest.ids[r]]) for r in rows if manifest.ids[r] in reasons]


def finetune(
    source: str | Path | Manifest,
    backbone: str,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    init_head: str | Path | None = None,
    trust: bool = False,
    device: str = "auto",
    amp: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    test_fraction: float = 0.2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Fine-tune a backbone on a source's train split, validate each epoch, test the best epoch once.

    Writes into ``out_dir``: ``checkpoint.pt`` (every epoch; resumes a killed run), ``model.safetensors``
    (the best weights, loadable as ``file:ARCH=PATH`` for extraction when the head is linear),
    ``finetune.json`` (how to rebuild it) and ``results.json`` (curves and test metrics, same schema as
    ``featx train``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each rank trains on its part of every global
    batch with :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on CUDA, gloo on the CPU);
    ``config.batch_size`` stays the global batch, so the run follows the single-process one (see
    ``docs/distributed.md``). Only rank 0 writes files; every rank returns the same results.

    Returns
    -------
    dict
        The results (test metrics under ``"test"``, per-epoch curves under ``"curves"``).
    """
    world, dev = _ddp.init(device)
    try:
        with reuse_freed_memory(dev.type == "cpu"):  # CPU training frees and re-faults big activations per step
            return _finetune(
                world,
                dev,
                source,
                backbone,
                config,
                Path(out_dir),
                init_head=init_head,
                trust=trust,
                amp=amp,
                workers=workers,
                overwrite=overwrite,
                progress=progress,
                test_fraction=test_fraction,
                max_pixels=max_pixels,
            )
    finally:
        _ddp.close(world)


def _finetune(
    world: _ddp.World,
    dev: torch.device,
    source: str | Path | Manifest,
    backbone: str,
    config: FinetuneConfig,
    out: Path,
    *,
    init_head: str | Path | None,
    trust: bool,
    amp: str,
    workers: int | None,
    overwrite: bool,
    progress: bool,
    test_fraction: float,
    max_pixels: int,
) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    amp = _resolve_amp(amp, dev)
    info = log.info if world.is_main else log.debug  # one story in the log, not one per rank
    resolve_backbone(backbone)
    manifest = (
        source if isinstance(source, Manifest) else load_source(source, seed=config.seed, test_fraction=test_fraction)
    )
    labelled_train = np.flatnonzero(np.array([s == "train" for s in manifest.splits]))
    if len(np.unique(manifest.labels[labelled_train])) < 2:
        raise ValueError(f"{manifest.source} has fewer than two classes in its training split; nothing to fine-tune")
    net = load_backbone(backbone)
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
    n_classes = len(manifest.class_names)
    with torch.random.fork_rng():  # the new head's initial weights follow the seed, nothing else's RNG
        torch.manual_seed(config.seed)
        head = _build_head(old_head.in_features, n_classes, config.hidden, config.dropout)
    init_ref = None
    if init_head is not None:
        if config.hidden:
            raise ValueError("--init-head sets a linear head; it cannot be combined with an MLP head (--hidden)")
        W, b = head_from_logreg(init_head, net, manifest.class_names, trust=trust)
        linear = head if isinstance(head, nn.Linear) else head[-1]
        with torch.no_grad():
            linear.weight.copy_(W)
            linear.bias.copy_(b)
        init_ref = str(Path(init_head).resolve())
    _set_module(net.model, head_name, head)
    for p in net.model.parameters():
        p.requires_grad_(True)

    fp = manifest.fingerprint()
    if len(set(_ddp.gather_objects(world, fp))) > 1:
        raise RuntimeError(
            f"the ranks see different data at {manifest.source} (manifest fingerprints differ); every node "
            "must see the same files: put the dataset on a shared filesystem or copy it identically"
        )
    splits = np.array(manifest.splits)
    train_rows, val_rows = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    val_policy = "from source"
    if not len(val_rows):
        train_rows, val_rows = _carve_val(manifest.labels, train_rows, config.val_fraction, config.seed)
        val_policy = f"carved from train: {config.val_fraction:g} per class, seed {config.seed}"
    test_rows = np.flatnonzero(splits == "test")
    train_rows, bad_train = _readable_sharded(manifest, train_rows, max_pixels, world)
    val_rows, bad_val = _readable_sharded(manifest, val_rows, max_pixels, world)
    test_rows, bad_test = _readable_sharded(manifest, test_rows, max_pixels, world)
    skipped = bad_train + bad_val + bad_test
    if world.is_main:
        for image_id, reason in skipped:
            log.warning("skipping unreadable image %s: %s", image_id, reason)

    run_hash = _config_hash(config, net, fp, init_ref)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("run_hash") != run_hash:
            if not overwrite:
                raise SpecMismatchError(
                    f"{out} holds a fine-tuning run with other settings (data, backbone or config); pass --overwrite "
                    "to start afresh, or choose another --out"
                )
            state = None
    # Every rank must resume from the same place (they each read checkpoint.pt): a different answer means
    # --out is not one folder that all nodes see.
    positions = _ddp.gather_objects(world, None if state is None else (state["phase"], state["epoch_in_phase"]))
    if len(set(positions)) > 1:
        raise RuntimeError(
            f"the ranks found different checkpoints in {out} (per rank: {positions}); --out must be a folder "
            "on a filesystem that every node sees"
        )

    pre = net.preprocessing
    if world.distributed and config.update_bn_stats:
        if dev.type == "cuda":  # batch statistics over the global batch, as on one GPU
            net.model = nn.SyncBatchNorm.convert_sync_batchnorm(net.model)
        elif world.is_main:
            warnings.warn(
                "update_bn_stats under gloo: BatchNorm statistics come from each rank's part of the batch "
                "(SyncBatchNorm needs CUDA), so the run will not match a single-process one",
                stacklevel=3,
            )
    model = _Classifier(net.model, pre).to(dev)
    channels_last = channels_last_pays(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    labels = manifest.labels
    paths = manifest.paths
    if workers is None:
        workers = default_workers()
    loader_kw = {"num_workers": workers, "pin_memory": dev.type == "cuda", "persistent_workers": False}
    train_set = _TrainImages([paths[r] for r in train_rows], labels[train_rows], pre, config.crop_scale, max_pixels)
    val_images = _EvalImages([paths[r] for r in val_rows], labels[val_rows], pre, max_pixels)
    predict_kw = {"batch_size": config.batch_size, "loader_kw": loader_kw, "device": dev, "amp": amp}
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, reduction="none")
    steps_per_epoch = max(1, math.ceil(len(train_rows) / config.batch_size))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    curves: list[dict[str, Any]] = []
    best = {"metric": None, "epoch": None}
    start_phase, start_epoch, stale = 0, 0, 0
    if state is not None:
        model.net.load_state_dict(state["model"])
        curves, best = state["curves"], state["best"]
        start_phase, start_epoch, stale = state["phase"], state["epoch_in_phase"], state["stale"]
        info("resuming %s at phase %d, epoch %d", out, start_phase + 1, start_epoch + 1)
    global_epoch = sum(p.epochs for p in config.phases[:start_phase]) + start_epoch
    total_epochs = sum(p.epochs for p in config.phases)
    bar = tqdm(
        total=total_epochs,
        initial=global_epoch,
        unit="epoch",
        desc="finetune",
        disable=not (progress and world.is_main),
    )
    best_path = out / WEIGHTS

    for phase_index in range(start_phase, len(config.phases)):
        phase = config.phases[phase_index]
        trainable = _set_trainable(model.net, blocks, head_name, phase)
        optimizer = _optimizer(model.net, head_name, config, phase.lr)
        # DDP is rebuilt per phase: it registers gradient hooks only on the parameters that train now.
        step_model: nn.Module = (
            DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
            if world.distributed
            else model
        )
        total_steps = phase.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(total_steps, round(config.warmup * total_steps))
        )
        first_epoch = start_epoch if phase_index == start_phase else 0
        if state is not None and phase_index == start_phase and first_epoch > 0:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        if phase_index != start_phase:
            stale = 0
        info(
            "phase %d/%d %s: %d trainable tensors, lr %g",
            phase_index + 1,
            len(config.phases),
            phase.freeze,
            len(trainable),
            phase.lr,
        )
        for epoch in range(first_epoch, phase.epochs):
            seed = _epoch_seed(config.seed, global_epoch)
            torch.manual_seed((seed + 7919 * world.rank) % 2**31)  # dropout masks differ between ranks
            train_loader = DataLoader(
                train_set,
                batch_sampler=_GlobalBatches(len(train_set), config.batch_size, seed, world.rank, world.size),
                **loader_kw,
            )
            _train_mode(model.net, config.update_bn_stats)
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0.0, 0.0
            lr_sums: dict[str, float] = {}
            steps = 0
            for images, y, weight in train_loader:
                images, y = images.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                weight = weight.to(dev, dtype=torch.float32, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    logits = step_model(images)
                    per_image = criterion(logits.float(), y)
                    # world/len(global batch) per image: DDP's mean over ranks makes this the global batch mean.
                    loss = (per_image * weight).sum()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                for group in {g["featx_group"]: g for g in optimizer.param_groups}.values():
                    lr_sums[group["featx_group"]] = lr_sums.get(group["featx_group"], 0.0) + group["lr"]
                steps += 1
                scheduler.step()
                real = (weight > 0).float()
                loss_sum += float((per_image.detach() * real).sum().item())
                correct += float(((logits.argmax(1) == y).float() * real).sum().item())
                seen += float(real.sum().item())
            seconds = time.perf_counter() - t0
            loss_sum, correct, seen = _ddp.sum_floats(world, [loss_sum, correct, seen], dev)
            val_scores, val_y, val_loss = _predict_rows(model, val_images, world, n_classes=n_classes, **predict_kw)
            val_acc = float((val_scores.argmax(1) == val_y).mean()) if len(val_y) else float("nan")
            lrs = {name: total / max(1, steps) for name, total in lr_sums.items()}  # mean over the epoch's steps
            curves.append(
                {
                    "epoch": global_epoch + 1,
                    "phase": phase_index + 1,
                    "freeze": phase.freeze,
                    "train_loss": loss_sum / max(1, seen),
                    "train_accuracy": correct / max(1, seen),
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "lr_head": lrs.get("head"),
                    "lr_backbone": lrs.get("backbone"),
                    "images_per_second": seen / seconds if seconds > 0 else None,
                    "seconds": seconds,
                }
            )
            metric = val_acc if config.metric == "val_accuracy" else -val_loss
            if best["metric"] is None or metric > best["metric"]:
                best = {"metric": metric, "epoch": global_epoch + 1}
                stale = 0
                if world.is_main:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(best_path))
            else:
                stale += 1
            global_epoch += 1
            last_in_phase = epoch + 1 == phase.epochs or (config.patience is not None and stale >= config.patience)
            if world.is_main:  # the ranks hold the same weights: one writer
                _atomic_torch_save(
                    {
                        "run_hash": run_hash,
                        "model": model.net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "curves": curves,
                        "best": best,
                        "phase": phase_index + 1 if last_in_phase else phase_index,
                        "epoch_in_phase": 0 if last_in_phase else epoch + 1,
                        "stale": 0 if last_in_phase else stale,
                    },
                    ckpt_path,
                )
            _ddp.barrier(world)
            bar.update(1)
            bar.set_postfix(val_acc=f"{val_acc:.3f}", refresh=False)
            if config.patience is not None and stale >= config.patience:
                info("no improvement for %d epochs: ending phase %d early", stale, phase_index + 1)
                bar.update(phase.epochs - epoch - 1)
                global_epoch += phase.epochs - epoch - 1
                break
        state = None
        start_epoch = 0
        del step_model
    bar.close()

    # The best epoch's weights, tested once.
    from safetensors.torch import load_file

    model.net.load_state_dict(load_file(str(best_path)))
    test_metrics = None
    if len(test_rows):
        test_images = _EvalImages([paths[r] for r in test_rows], labels[test_rows], pre, max_pixels)
        t0 = time.perf_counter()
        scores, y_test, _ = _predict_rows(model, test_images, world, n_classes=n_classes, **predict_kw)
        predict_seconds = time.perf_counter() - t0
        test_metrics = evaluate(y_test, scores.argmax(1), manifest.class_names, scores=scores, seed=config.seed)
        test_metrics["predict_seconds"] = round(predict_seconds, 4)
        test_metrics["split"] = "test"
    family = _family(net)
    meta = {
        "format": "featx.finetuned",
        "format_version": 1,
        "backbone": net.name,
        "architecture": family,
        "weights_sha256_before": net.weights_sha256,
        "class_names": manifest.class_names,
        "preprocessing": dataclasses.asdict(pre),
        "head": {"name": head_name, "hidden": list(config.hidden), "dropout": config.dropout},
        "config": config.to_dict(),
        "init_head": init_ref,
        "best_epoch": best["epoch"],
        "extract_with": f"file:{family}={best_path.resolve()}" if not config.hidden else None,
    }
    n_train = len(train_rows)
    results = {
        "schema": "featx.results/1",
        "kind": "finetune",
        "method": ("lp-ft" if init_ref else "finetune") + f"[{config.label}] · {net.name.split(':', 1)[-1]}",
        "store": None,
        "source": manifest.source,
        "split_policy": manifest.split_policy,
        "val_policy": val_policy,
        "manifest_fingerprint": fp,
        "backbone": net.name,
        "finetune": {
            **config.to_dict(),
            "blocks": len(blocks),
            "init_head": init_ref,
            "amp": amp,
            "device": str(dev),
            "world_size": world.size,
        },
        "curves": curves,
        "best_epoch": best["epoch"],
        "skipped_images": [{"id": i, "reason": r} for i, r in skipped],
        "train": {
            "n": int(n_train),
            "val_n": len(val_rows),
            "fit_seconds": round(sum(c["seconds"] for c in curves), 3),
        },
        "test": test_metrics,
        "versions": library_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    if world.is_main:
        from featx.classify import write_results

        (out / FINETUNE_META).write_text(json.dumps(meta, indent=2))
        write_results(out / "results.json", results)
    _ddp.barrier(world)  # no rank returns (or exits) before the files are there
    return results


def _family(net: Backbone) -> str:
    """``timm:ARCH`` or ``torchvision:ARCH`` of a loaded backbone, to re-load its weights with ``file:``."""
    cfg = getattr(net.model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    if net.name.startswith("file:"):
        return net.name[len("file:") :].split("=", 1)[0]
    source, _, rest = net.name.partition(":")
    return f"{source}:{rest.split('.', 1)[0]}"


def load_finetuned(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned network (eval mode, CPU) and its metadata from a ``featx finetune`` folder."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta_path = out / FINETUNE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out} holds no {FINETUNE_META}; is it a `featx finetune --out` folder?")
    meta = json.loads(meta_path.read_text())
    net = load_backbone(meta["backbone"])
    head = net.model.get_submodule(meta["head"]["name"])
    _set_module(
        net.model,
        meta["head"]["name"],
        _build_head(head.in_features, len(meta["class_names"]), meta["head"]["hidden"], meta["head"]["dropout"]),
    )
    net.model.load_state_dict(load_file(str(out / WEIGHTS)))
    net.model.eval()
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    return _Classifier(net.model, pre).eval(), meta


def predict_finetuned(
    images: Sequence[str | Path], out_dir: str | Path, *, top_k: int = 5, device: str = "auto", batch_size: int = 64
) -> list:
    """Classify image files with a fine-tuned network (softmax scores); unreadable files get an error."""
    from featx._errors import ImageDecodeError
    from featx.classify import Prediction

    model, meta = load_finetuned(out_dir)
    dev = resolve_device(device)
    model = model.to(dev)
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    names = meta["class_names"]
    results: list[Prediction] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        with torch.inference_mode():
            probs = torch.softmax(model(torch.stack([t for _, t in batch]).to(dev)).float(), dim=1).cpu().numpy()
        for (i, _), p in zip(batch, probs, strict=True):
            order = np.argsort(-p)[: min(top_k, len(names))]
            results[i].label = names[int(order[0])]
            results[i].score = float(p[order[0]])
            results[i].top_k = [(names[int(c)], float(p[c])) for c in order]
        batch.clear()

    for path in images:
        resolved = str(Path(path).expanduser().resolve())
        results.append(Prediction(resolved))
        try:
            batch.append((len(results) - 1, load_for_model(resolved, pre)))
        except ImageDecodeError as exc:
            results[-1].error = str(exc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return results
