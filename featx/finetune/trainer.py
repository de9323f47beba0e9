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
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from featx._runtime import dist as _ddp
from featx._runtime.device import _resolve_amp, channels_last_pays
from featx._runtime.env import default_workers, library_versions
from featx._runtime.malloc import reuse_freed_memory
from featx.backbones.loading import load_backbone
from featx.backbones.names import resolve_backbone
from featx.data.manifest import Manifest
from featx.data.sources import load_source
from featx.exceptions import SpecMismatchError, UnknownNameError
from featx.finetune.artifacts import CHECKPOINT, FINETUNE_META, WEIGHTS, _atomic_torch_save, _config_hash
from featx.finetune.config import FinetuneConfig
from featx.finetune.data import _carve_val, _EvalImages, _GlobalBatches, _readable_sharded, _TrainImages
from featx.finetune.heads import (
    _build_head,
    _Classifier,
    _family,
    _set_module,
    _set_trainable,
    _train_mode,
    block_names,
    head_from_logreg,
)
from featx.metrics import evaluate
from featx.spec import DEFAULT_MAX_PIXELS

__all__ = ["finetune"]

log = logging.getLogger(__name__)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


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
        from featx.results import write_results

        (out / FINETUNE_META).write_text(json.dumps(meta, indent=2))
        write_results(out / "results.json", results)
    _ddp.barrier(world)  # no rank returns (or exits) before the files are there
    return results
