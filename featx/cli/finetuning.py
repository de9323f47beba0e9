"""The fine-tuning command: ``finetune``."""

from __future__ import annotations

import logging

import click

from featx.cli._shared import (
    batch_size_option,
    choice_option,
    device_option,
    no_progress_option,
    print_metrics,
    reported,
    split_plan_options,
)
from featx.finetune.config import DEFAULT_LAYER_DECAY, DEFAULT_PHASES, SCHEDULES, edge_words
from featx.spec import DEFAULT_BACKBONE

__all__ = ["finetune"]


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise ValueError(f"--hidden {text!r}: give comma-separated layer sizes, e.g. 512,256") from None


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--lr-candidates {text!r}: give comma-separated rates, e.g. 1e-3,3e-3,1e-2") from None


def _crop_scale(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--crop-scale {text!r}: give MIN,MAX, e.g. 0.25,1.0") from None
    return low, high


@click.command()
@click.argument("source")
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True)
@click.option(
    "--phases",
    default=DEFAULT_PHASES,
    show_default=True,
    help="FREEZE:EPOCHS:LR,… with FREEZE = head, topK or all; or a .toml file of [[phase]] tables.",
)
@click.option(
    "--lr",
    type=click.Choice(["phases", "auto"]),
    default="phases",
    show_default=True,
    help="auto: choose the base rate on val (the phases' rates become ratios to the first's); phases: as written. "
    "A phase's LR may also be auto, auto/10, auto*3.",
)
@click.option(
    "--lr-candidates",
    default="",
    help="Base rates to choose from, e.g. 1e-3,3e-3,1e-2 [default: sgd 1e-3,3e-3,1e-2; adamw 1e-4,3e-4,1e-3].",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Cap on the rate choice: candidates that would end past it are not tried (the results say which).",
)
@click.option(
    "--init-head",
    type=click.Path(dir_okay=False),
    default=None,
    help="LP-FT: start the head from a `featx train -c logreg` model.skops on this backbone's features.",
)
@click.option("--trust", is_flag=True, help="Trust --init-head files holding types that could run code.")
@batch_size_option(default=32)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option(
    "--clip-grad", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Max grad norm (0: off)."
)
@click.option(
    "--backbone-lr-mult",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="The backbone's learning rate relative to the head's.",
)
@click.option(
    "--layer-decay",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_LAYER_DECAY,
    show_default=True,
    help="Each backbone block below the top trains at this times the rate of the one above (1: no decay).",
)
@click.option(
    "--warmup",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of the schedule's steps spent warming up.",
)
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default="phase",
    show_default=True,
    help="phase: a warm-up + cosine per phase; run: one over the whole run.",
)
@click.option("--hidden", default="", help="Hidden sizes of an MLP head, e.g. 512,256 [default: linear head].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=None, help="End a phase after N epochs without gain.")
@click.option("--metric", type=click.Choice(["val_accuracy", "val_loss"]), default="val_accuracy", show_default=True)
@click.option(
    "--crop-scale",
    default="0.25,1.0",
    show_default=True,
    help="Area range MIN,MAX of the training random resized crop.",
)
@click.option(
    "--flip/--no-flip",
    default=True,
    show_default=True,
    help="Flip training images horizontally at random; --no-flip where a mirror image changes the label (digits).",
)
@click.option(
    "--update-bn-stats",
    is_flag=True,
    help="Let unfrozen BatchNorm layers update their running statistics (kept fixed by default).",
)
@device_option()
@choice_option("amp")
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Training seed (head init, batches, augmentation)."
)
@split_plan_options()
@click.option("--overwrite", is_flag=True, help="Start afresh if --out holds a run with other settings.")
@no_progress_option(help=None)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True)
def finetune(
    source,
    backbone,
    phases,
    init_head,
    trust,
    hidden,
    crop_scale,
    lr_candidates,
    device,
    amp,
    workers,
    overwrite,
    no_progress,
    out_dir,
    plan,
    **settings,
) -> None:
    """Fine-tune a backbone on SOURCE in phases; resumable. It trains on train, chooses its epoch (epoch 0,
    the weights before any update, included) and, with --lr auto, its learning rate on val, and is tested
    once on test, the splits of the split plan: the same plan as `featx train` gives both the same images.

    \b
    On several GPUs or nodes, launch it with torchrun (DistributedDataParallel; --batch-size is global):
    torchrun --nproc-per-node 4 -m featx finetune SOURCE --out DIR …
    """
    from featx._runtime.dist import env_rank
    from featx.finetune.config import FinetuneConfig, parse_phases
    from featx.finetune.trainer import finetune as run_finetune

    if env_rank() != 0:  # under torchrun, rank 0 tells the story
        logging.getLogger("featx").setLevel(logging.WARNING)
    with reported("the last epoch's checkpoint is kept"):
        config = FinetuneConfig(
            phases=tuple(parse_phases(phases)),
            hidden=_hidden_sizes(hidden),
            crop_scale=_crop_scale(crop_scale),
            lr_candidates=_rates(lr_candidates),
            **settings,  # every other setting under FinetuneConfig's own name
        )
        results = run_finetune(
            source,
            backbone,
            config,
            out_dir,
            init_head=init_head,
            trust=trust,
            device=device,
            amp=amp,
            workers=workers,
            overwrite=overwrite,
            progress=not no_progress,
            plan=plan,
        )
    if env_rank() != 0:
        return
    for c in results["curves"]:
        trained = f"train loss {c['train_loss']:.4f}, " if c["train_loss"] is not None else "before any update, "
        speed = f", {c['images_per_second']:.1f} images/s" if c["images_per_second"] else ""
        click.echo(f"  epoch {c['epoch']:>3} {c['freeze']:>5}: {trained}val accuracy {c['val_accuracy']:.4f}{speed}")
    sweep = results.get("lr_sweep")
    if sweep:
        tried = ", ".join(
            f"{r['lr']:g} → val loss {r['val_loss'] if r['val_loss'] is None else round(r['val_loss'], 4)}, "
            f"accuracy {r['val_accuracy']:.4f}"
            for r in sweep["runs"]
        )
        cut = f"; not tried (--max-minutes): {', '.join(f'{lr:g}' for lr in sweep['cut'])}" if sweep["cut"] else ""
        edge = edge_words(sweep.get("at_edge"))
        click.echo(f"learning rate chosen by {sweep['selected_by']}: {sweep['chosen']:g}{edge} ({tried}{cut})")
    ft = results["finetune"]
    low, high = ft["crop_scale"]
    click.echo(
        f"augmentation: random resized crop of {low:g}–{high:g} of the area, flip {'on' if ft['flip'] else 'off'}"
    )
    click.echo(
        f"best epoch {results['best_epoch']}"
        + (" (the weights before any update)" if not results["best_epoch"] else "")
    )
    if results["test"]:
        print_metrics(results["test"])
    click.echo(f"wrote {out_dir}/model.safetensors, finetune.json and results.json")
    uses = f"featx predict IMAGES --model {out_dir}"
    if not results["finetune"].get("hidden"):  # a linear head: the folder names the network for extraction too
        uses += f"; featx extract SOURCE --backbone {out_dir}"
    click.echo(f"use it: {uses}")
