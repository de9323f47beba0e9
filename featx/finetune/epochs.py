"""The training loop of a fine-tuning run: one phase, one epoch, one step, and predicting on every rank.

Internal to :mod:`featx.finetune`: the middle steps of :func:`featx.finetune.trainer.finetune`. Each phase
builds its own optimiser (discriminative rates: the backbone's at ``backbone_lr_mult`` times the head's, lower
blocks ``layer_decay`` times lower per block) and its stretch of a linear warm-up then cosine schedule (its own,
or the whole run's); each epoch draws its global batches and augmentation from a seed of its
own, so a resumed run trains on exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from featx._runtime import dist as _ddp
from featx._runtime.device import autocast, channels_last_pays
from featx._runtime.progress import Progress
from featx.finetune.artifacts import CHECKPOINT, WEIGHTS, save_weights
from featx.finetune.config import FinetuneConfig, Phase
from featx.finetune.data import EvalImages, GlobalBatches
from featx.finetune.heads import set_train_mode, set_trainable
from featx.finetune.prepare import Run
from featx.finetune.state import RunState, save_checkpoint
from featx.results import EpochRecord

__all__ = [
    "LivePhase",
    "epochs_before",
    "evaluate_start",
    "finish_epoch",
    "predict",
    "setup_phase",
    "train_epoch",
    "train_phase",
    "validate",
]


def _lr_lambda(total_steps: int, warmup_steps: int, offset: int = 0):
    """The factor of the peak rate at a phase's ``step``: linear warm-up, then a cosine to 0 at ``total_steps``;
    ``offset`` steps of the same curve went before the phase (``schedule="run"``)."""

    def factor(step: int) -> float:
        step += offset
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _schedule(config: FinetuneConfig, phase_index: int, steps_per_epoch: int):
    """Phase ``phase_index``'s rate factor per step: its own curve, or its stretch of the run's."""
    if config.schedule == "phase":
        total, offset = config.phases[phase_index].epochs * steps_per_epoch, 0
    else:
        total = sum(p.epochs for p in config.phases) * steps_per_epoch
        offset = epochs_before(config, phase_index) * steps_per_epoch
    return _lr_lambda(total, round(config.warmup * total), offset)


def _optimizer(
    model: nn.Module, head: str, blocks: list[list[str]], config: FinetuneConfig, lr: float
) -> torch.optim.Optimizer:
    """The phase's optimiser: the head at ``lr``, the backbone at ``backbone_lr_mult`` times it, each block below
    the top one ``layer_decay`` times lower again; no weight decay on biases and normalisation parameters."""
    depth = _depth_from_top(blocks, config.layer_decay)
    groups: dict[tuple[bool, int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name == head or name.startswith(head + ".")
        no_decay = p.ndim <= 1  # biases and normalisation parameters
        groups.setdefault((is_head, 0 if is_head else depth.get(name, 0), no_decay), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": lr if is_head else lr * config.backbone_lr_mult * config.layer_decay**d,
            "weight_decay": 0.0 if no_decay else config.weight_decay,
            # The top block's groups are "backbone" (the rate a results row records), the ones below "backbone-D".
            "featx_group": "head" if is_head else ("backbone" if d == 0 else f"backbone-{d}"),
        }
        for (is_head, d, no_decay), params in sorted(groups.items())
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=lr)


def _depth_from_top(blocks: list[list[str]], layer_decay: float) -> dict[str, int]:
    """Each backbone parameter's block, counted from the top (0) down; all 0 without layer decay, so the groups
    (and a checkpoint's optimiser state) are those of a run without it. A parameter in no block (rare: the blocks
    cover the backbone) trains at the top block's rate."""
    if layer_decay == 1.0:
        return {}
    return {name: len(blocks) - 1 - i for i, block in enumerate(blocks) for name in block}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


@torch.inference_mode()
def _predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: str, n_classes: int) -> tuple:
    """Scores, labels and the summed cross-entropy of everything in ``loader``."""
    model.eval()
    logits, labels, loss_sum = [], [], 0.0
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if channels_last_pays(device):
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(out, y.to(device), reduction="sum").item())
        logits.append(out.cpu())
        labels.append(y)
    if not logits:  # this rank's shard is empty
        return np.zeros((0, n_classes), dtype=np.float32), np.zeros(0, dtype=np.int64), 0.0
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), loss_sum


def _predict_rows(
    model: nn.Module,
    images: EvalImages,
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


def predict(run: Run, images: EvalImages) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores and labels of every image, on every rank, and the mean loss (:func:`_predict_rows`)."""
    return _predict_rows(
        run.model,
        images,
        run.world,
        batch_size=run.config.batch_size,
        loader_kw=run.loader_kw,
        device=run.dev,
        amp=run.amp,
        n_classes=len(run.rows.manifest.class_names),
    )


def evaluate_start(run: Run, state: RunState) -> None:
    """Epoch 0: the model before any update (for LP-FT, the probe's head on the frozen backbone) on val.

    It is the first candidate for the best epoch, so a run whose training only hurts on val ends with its
    starting weights (LP-FT never ends below its starting head on val: the probe as folded).
    """
    t0 = time.perf_counter()
    val_loss, val_acc = validate(run)
    record: EpochRecord = {
        "epoch": 0,
        "phase": 0,
        "freeze": "start",
        "train_loss": None,
        "train_accuracy": None,
        "val_loss": finite_or_none(val_loss),
        "val_accuracy": val_acc,
        "lr_head": None,
        "lr_backbone": None,
        "images_per_second": None,
        "seconds": time.perf_counter() - t0,
    }
    state.curves.append(record)
    _keep_if_best(run, state, _monitored(run.config, val_loss, val_acc), 0)
    run.info("epoch 0 (before any update): val loss %.4f, val accuracy %.4f", val_loss, val_acc)


def _monitored(config: FinetuneConfig, val_loss: float, val_acc: float) -> float:
    """The monitored metric, higher is better; a diverged epoch (NaN) is the worst there is."""
    metric = val_acc if config.metric == "val_accuracy" else -val_loss
    return metric if math.isfinite(metric) else -math.inf


def _keep_if_best(run: Run, state: RunState, metric: float, epoch: int) -> None:
    """Count ``epoch``'s metric; when it is the best so far (ties keep the earlier epoch), save its weights."""
    if state.record(metric, epoch) and run.world.is_main:
        save_weights(run.out / WEIGHTS, run.model.net)


@dataclass
class LivePhase:
    """A phase's live training objects: the model to step (DDP-wrapped on several ranks), its optimiser and
    schedule, for the phase's peak rate ``lr``."""

    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lr: float
    trainable: set[str]

    def restore(self, run: Run, saved: dict[str, Any]) -> None:
        """Load the ``optimizer``, ``scheduler`` and ``scaler`` state dicts of ``saved`` (a phase cut short)."""
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        run.scaler.load_state_dict(saved["scaler"])


def setup_phase(run: Run, phase_index: int, lr: float) -> LivePhase:
    """Freeze what the phase does not train; a fresh optimiser at peak rate ``lr`` and the phase's schedule."""
    from torch.nn.parallel import DistributedDataParallel

    config = run.config
    phase = config.phases[phase_index]
    trainable = set_trainable(run.model.net, run.built.blocks, run.built.head_name, phase)
    optimizer = _optimizer(run.model.net, run.built.head_name, run.built.blocks, config, lr)
    # DDP is rebuilt per phase: it registers gradient hooks only on the parameters that train now.
    step_model: nn.Module = (
        DistributedDataParallel(run.model, device_ids=[run.dev.index] if run.dev.type == "cuda" else None)
        if run.world.distributed
        else run.model
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, phase_index, run.steps_per_epoch))
    return LivePhase(step_model, optimizer, scheduler, lr, trainable)


def epochs_before(config: FinetuneConfig, phase_index: int) -> int:
    """How many epochs the phases before ``phase_index`` train (its first epoch's 0-based global index)."""
    return sum(p.epochs for p in config.phases[:phase_index])


def train_phase(run: Run, state: RunState, phase_index: int, bar: Any, live: LivePhase | None = None) -> None:
    """Train one phase from ``state``'s epoch on: freeze what the phase does not train, then per epoch
    train, validate, keep the best weights and write the checkpoint; end early after ``patience``.

    ``live`` goes on with objects already set up (the chosen candidate of a learning-rate choice)."""
    config = run.config
    phase = config.phases[phase_index]
    if live is None:
        live = setup_phase(run, phase_index, phase.rate(state.lr_base))
        if state.resumes_mid_phase:
            live.restore(run, {"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler})
    state.release()
    n_phases = len(config.phases)
    run.info(
        "phase %d/%d %s: %d trainable tensors, lr %g",
        phase_index + 1,
        n_phases,
        phase.freeze,
        len(live.trainable),
        live.lr,
    )
    first = epochs_before(config, phase_index)
    for epoch in range(state.epoch_in_phase, phase.epochs):
        stats = train_epoch(run, live.step_model, live.optimizer, live.scheduler, first + epoch)
        val_loss, val_acc = validate(run)
        record = epoch_record(first + epoch, phase_index, phase, stats, val_loss, val_acc)
        if finish_epoch(run, state, phase_index, epoch, record, (val_loss, val_acc), live, bar):
            break


def finish_epoch(
    run: Run,
    state: RunState,
    phase_index: int,
    epoch: int,
    record: EpochRecord,
    val: tuple[float, float],
    live: LivePhase,
    bar: Any,
) -> bool:
    """After an epoch of a phase: record it, keep its weights if best, move on, write the checkpoint (rank 0).
    Returns whether the phase ends early (``patience`` epochs without gain)."""
    config, world = run.config, run.world
    phase = config.phases[phase_index]
    state.curves.append(record)
    _keep_if_best(run, state, _monitored(config, *val), record["epoch"])
    stale = state.stale
    stop = config.patience is not None and stale >= config.patience
    state.advance(phase_index, epoch, phase_done=stop or epoch + 1 == phase.epochs)
    if world.is_main:  # the ranks hold the same weights: one writer
        save_checkpoint(
            run.out / CHECKPOINT, state.with_live(run.model.net, live.optimizer, live.scheduler, run.scaler)
        )
    _ddp.barrier(world)
    bar.update(1)
    bar.set_postfix(val_acc=f"{val[1]:.3f}", refresh=False)
    if stop:
        run.info("no improvement for %d epochs: ending phase %d early", stale, phase_index + 1)
        bar.update(phase.epochs - epoch - 1)
    return stop


@dataclass(frozen=True)
class _EpochStats:
    """One epoch's training loss and accuracy over the real images of every rank, and its learning rates."""

    loss: float
    accuracy: float
    images: float
    seconds: float
    lrs: dict[str, float]  # mean over the epoch's steps, per parameter group ("head", "backbone")


def train_epoch(
    run: Run,
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    global_epoch: int,
) -> _EpochStats:
    """One pass over the training images in the epoch's seeded global batches (each rank its part)."""
    config, world = run.config, run.world
    seed = _epoch_seed(config.seed, global_epoch)
    with torch.random.fork_rng(devices=[run.dev] if run.dev.type == "cuda" else []):
        torch.manual_seed((seed + 7919 * world.rank) % 2**31)  # dropout masks differ between ranks
        return _epoch_pass(run, step_model, optimizer, scheduler, seed, global_epoch)


def _epoch_pass(
    run: Run,
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    seed: int,
    global_epoch: int,
) -> _EpochStats:
    config, world = run.config, run.world
    loader = DataLoader(
        run.train_set,
        batch_sampler=GlobalBatches(len(run.train_set), config.batch_size, seed, world.rank, world.size),
        **run.loader_kw,
    )
    set_train_mode(run.model.net, config.update_bn_stats)
    t0 = time.perf_counter()
    totals = [0.0, 0.0, 0.0]  # loss, correct, images (weight-0 padding images excluded)
    lr_sums: dict[str, float] = {}
    steps = 0
    # Per batch: a CPU epoch can take minutes. Off a terminal, a line every 30 s (the run's bar logs per tenth).
    with Progress(
        len(loader),
        desc=f"epoch {global_epoch + 1}",
        unit="batch",
        disable=not run.progress,
        every_fraction=None,
        leave=False,
    ) as bar:
        for images, y, weight in loader:
            sums = _train_step(run, step_model, optimizer, images, y, weight)
            for group in {g["featx_group"]: g for g in optimizer.param_groups}.values():
                lr_sums[group["featx_group"]] = lr_sums.get(group["featx_group"], 0.0) + group["lr"]
            steps += 1
            scheduler.step()
            totals = [a + b for a, b in zip(totals, sums, strict=True)]
            bar.update(1)
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen = _ddp.sum_floats(world, totals, run.dev)
    return _EpochStats(
        loss=loss_sum / max(1, seen),
        accuracy=correct / max(1, seen),
        images=seen,
        seconds=seconds,
        lrs={name: total / max(1, steps) for name, total in lr_sums.items()},
    )


def _train_step(
    run: Run,
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[float, float, float]:
    """One optimiser step on this rank's part of a global batch; its summed loss, correct and images."""
    dev = run.dev
    images, y = images.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    weight = weight.to(dev, dtype=torch.float32, non_blocking=True)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(dev, run.amp):
        logits = step_model(images)
        per_image = run.criterion(logits.float(), y)
        # world/len(global batch) per image: DDP's mean over ranks makes this the global batch mean.
        loss = (per_image * weight).sum()
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.config.clip_grad:
        run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], run.config.clip_grad)
    run.scaler.step(optimizer)
    run.scaler.update()
    real = (weight > 0).float()
    return (
        float((per_image.detach() * real).sum().item()),
        float(((logits.argmax(1) == y).float() * real).sum().item()),
        float(real.sum().item()),
    )


def validate(run: Run) -> tuple[float, float]:
    """The mean loss and the accuracy on the val images (NaN accuracy when there are none)."""
    scores, y, loss = predict(run, run.val_images)
    accuracy = float((scores.argmax(1) == y).mean()) if len(y) else float("nan")
    return loss, accuracy


def epoch_record(
    global_epoch: int, phase_index: int, phase: Phase, stats: _EpochStats, val_loss: float, val_acc: float
) -> EpochRecord:
    return {
        "epoch": global_epoch + 1,
        "phase": phase_index + 1,
        "freeze": phase.freeze,
        "train_loss": finite_or_none(stats.loss),
        "train_accuracy": stats.accuracy,
        "val_loss": finite_or_none(val_loss),
        "val_accuracy": val_acc,
        "lr_head": stats.lrs.get("head"),
        "lr_backbone": stats.lrs.get("backbone"),
        "images_per_second": stats.images / stats.seconds if stats.seconds > 0 else None,
        "seconds": stats.seconds,
    }


def finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` for a diverged one (NaN, infinite): results are strict JSON."""
    return value if math.isfinite(value) else None
