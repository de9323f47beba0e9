"""The fine-tuning command: ``finetune``."""

from __future__ import annotations

import logging

import click

from featx.cli._shared import (
    build,
    device_option,
    no_progress_option,
    out_folder_option,
    print_metrics,
    reported,
    split_plan_options,
    table_option,
    table_options,
)
from featx.data.splits import FinalFit
from featx.finetune.config import FinetuneConfig, edge_words
from featx.spec import DEFAULT_BACKBONE, ExtractionOptions

__all__ = ["finetune"]


@click.command()
@click.argument("source")
@click.option(
    "--backbone",
    "-b",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="SOURCE:NAME[.TAG] of the network to fine-tune, as for `featx extract`.",
)
@click.option(
    "--init-head",
    type=click.Path(dir_okay=False),
    default=None,
    help="LP-FT: start the head from a `featx train -c logreg` model.skops on this backbone's features.",
)
@click.option("--trust", is_flag=True, help="Trust --init-head files holding types that could run code.")
@table_options(FinetuneConfig)
@device_option()
@table_option(ExtractionOptions, "amp")
@table_option(ExtractionOptions, "workers", help="Image-decoding processes [default: CPU cores, max 8].")
@split_plan_options()
@table_options(FinalFit)
@click.option("--overwrite", is_flag=True, help="Start afresh if --out holds a run with other settings.")
@no_progress_option()
@out_folder_option("Folder for checkpoint.pt, model.safetensors, finetune.json and results.json.")
def finetune(
    source,
    backbone,
    init_head,
    trust,
    device,
    amp,
    workers,
    overwrite,
    no_progress,
    out_dir,
    plan,
    refit,
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
    from featx.finetune.trainer import finetune as run_finetune

    if env_rank() != 0:  # under torchrun, rank 0 tells the story
        logging.getLogger("featx").setLevel(logging.WARNING)
    with reported("the last epoch's checkpoint is kept"):
        config = build(FinetuneConfig, settings)  # every setting under FinetuneConfig's own name
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
            refit=refit,
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
    if results.get("refit"):
        r = results["refit"]
        click.echo(
            f"refit on {r['on']} ({r['n']} images): {r['epochs']} epochs at the chosen rate, {r['seconds']:.0f} s"
        )
    if results["test"]:
        print_metrics(results["test"])
    click.echo(f"wrote {out_dir}/model.safetensors, finetune.json and results.json")
    uses = f"featx predict IMAGES --model {out_dir}"
    if not results["finetune"].get("hidden"):  # a linear head: the folder names the network for extraction too
        uses += f"; featx extract SOURCE --backbone {out_dir}"
    click.echo(f"use it: {uses}")
