"""Commands of the extraction stage: ``extract``, ``join``, ``info`` and ``backbones``."""

from __future__ import annotations

import json
from typing import Any

import click

from featx.cli._shared import (
    build,
    device_option,
    max_failures_option,
    no_progress_option,
    print_failures,
    refuse_too_many_failures,
    reported,
    split_plan_options,
    table_options,
)
from featx.spec import DEFAULT_BACKBONE, ExtractionOptions

__all__ = ["backbones", "extract", "info", "join"]


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from featx.extract.sharded import Shard

    try:
        return Shard.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("source")
@click.option(
    "--backbone",
    "-b",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="SOURCE:NAME[.TAG], e.g. torchvision:resnet50.IMAGENET1K_V2, timm:convnext_tiny, file:resnet50=ckpt.pt.",
)
@click.option(
    "--layer",
    "-l",
    "layers",
    multiple=True,
    default=["penultimate"],
    show_default=True,
    help="Layer to extract; repeat for several in one pass. `featx backbones --layers NAME` lists them.",
)
@table_options(ExtractionOptions)
@device_option(help="auto, cpu, cuda, cuda:N or mps.")
@max_failures_option("Failed images tolerated before the exit code is 3: a count, a percentage like 1%, or inf.")
@click.option("--overwrite", is_flag=True, help="Replace a store (or interrupted job) made with another spec.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Store path (.h5) [default: in the featx cache, named by the cache key].",
)
@no_progress_option()
@click.option(
    "--shard",
    default=None,
    callback=_parse_shard,
    metavar="INDEX/COUNT",
    help="Extract only this shard of the images (INDEX from 0) into OUT.shards/, e.g. to re-run one dead "
    "torchrun rank alone; then `featx join OUT`.",
)
@click.option(
    "--distributed/--no-distributed",
    default=None,
    help="Run as one rank of a torchrun job: each rank extracts its shard, rank 0 joins them into OUT "
    "[default: on when launched by torchrun with more than one process].",
)
def extract(
    source, backbone, layers, device, max_failures, overwrite, out, no_progress, shard, distributed, **options
) -> None:
    """Embed the images of SOURCE into an HDF5 feature store.

    SOURCE is an image folder (root/<class>/<img> or root/<split>/<class>/<img>), a CSV/TSV manifest
    (path,label[,split]), a .txt list of images, `digits`, or `torchvision:NAME`.

    \b
    On several GPUs or machines (see docs/distributed.md):
    torchrun --nproc-per-node 4 -m featx extract SOURCE --out STORE.h5
    """
    from featx._runtime.dist import TorchrunEnv
    from featx.extract.api import extract as run_extract

    checked = build(ExtractionOptions, options)  # the table's options, as one object
    with reported("the batches written so far are kept"):
        if distributed is None:  # on by default under torchrun with several processes, unless one shard is asked for
            env = TorchrunEnv.detect()
            distributed = shard is None and env is not None and env.world_size > 1
        result = run_extract(
            source,
            backbone,
            layers=layers,
            options=checked,
            out=out,
            device=device,
            max_failures=str(max_failures),
            overwrite=overwrite,
            progress=not no_progress,
            shard=shard,
            distributed=distributed,
        )
    if result.shard is not None:
        _print_shard_summary(result)
        return
    if result.rank not in (None, 0):
        return  # rank 0 reports the whole job
    _print_summary(result)
    if result.too_many_failures:
        refuse_too_many_failures(result.n_failed, result.max_failures)


def _print_shard_summary(result) -> None:
    who = f"rank {result.rank}: " if result.rank is not None else ""
    if result.cached:
        line = f"{who}shard {result.shard} is already done ({result.n_done} images, {result.n_failed} failed)"
    else:
        line = f"{who}shard {result.shard}: extracted {result.n_done} of {result.n_images} images, {result.n_failed} "
        line += f"failed, in {result.seconds:.1f} s"
        if result.resumed_rows:
            line += f"; resumed after {result.resumed_rows} already done"
    click.echo(line)
    print_failures(result.failures)
    if result.rank is None:
        click.echo(f"shard store: {result.path}")
        store = result.path.parent.with_name(result.path.parent.name.removesuffix(".shards"))
        click.echo(f"when every shard is done: featx join {store}")


def _print_summary(result) -> None:
    if result.cached:
        click.echo(
            f"cache hit: {result.path} already holds these features (key {result.key[:12]}): "
            f"{result.n_done} images, {result.n_failed} failed; nothing to do ({result.seconds:.1f} s)"
        )
    else:
        line = (
            f"extracted {result.n_done} of {result.n_images} images, {result.n_failed} failed, "
            f"in {result.seconds:.1f} s"
        )
        if result.images_this_run:
            line += f" ({result.images_per_second:.1f} images/s on {result.device})"
        if result.resumed_rows:
            line += f"; resumed after {result.resumed_rows} already done"
        click.echo(line)
        click.echo(f"store: {result.path}")
    print_failures(result.failures)
    if len(result.failures) > 10:
        click.echo(f"  ... and {len(result.failures) - 10} more (`featx info STORE --failures`)", err=True)


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option(
    "--shards",
    "count",
    type=click.IntRange(min=1),
    default=None,
    help="Number of shards of the run to join [default: from the shard file names].",
)
@click.option("--keep-shards", is_flag=True, help="Keep STORE.shards/ after a successful join.")
@click.option("--overwrite", is_flag=True, help="Replace a STORE made with another spec.")
@max_failures_option("Failed images tolerated (over all shards) before the exit code is 3.")
def join(store, count, keep_shards, overwrite, max_failures) -> None:
    """Join the shards in STORE.shards/ (from torchrun or --shard runs) into STORE.

    Refuses, naming the fix, when a shard is missing, unfinished, or from another job or shard count;
    nothing is deleted then.
    """
    from featx.extract.sharded import join_shards

    with reported("the shards are kept"):
        result = join_shards(store, count=count, overwrite=overwrite, keep_shards=keep_shards)
    if result.cached:
        click.echo(f"{result.path} is already joined (key {result.key[:12]}); nothing to do")
    else:
        click.echo(
            f"joined {result.n_shards} shards into {result.path}: {result.n_done} of {result.n_images} images, "
            f"{result.n_failed} failed ({result.seconds:.1f} s)"
        )
    print_failures(result.failures)
    if max_failures.exceeded(result.n_failed, result.n_images):
        refuse_too_many_failures(result.n_failed, max_failures)


@click.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the provenance as JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="List every failed image with its reason.")
@split_plan_options()
def info(store, as_json, show_failures, plan) -> None:
    """Show how STORE was made: backbone, weights, layers, preprocessing, images, versions; and its splits
    under a split plan. Given a model file (`featx train`) or a `featx finetune` folder, describe that."""
    import zipfile
    from pathlib import Path

    from featx.store.reader import FeatureStore

    path = Path(store)
    if path.is_dir() and (path / "finetune.json").is_file():
        _finetune_info(path, as_json)
        return
    if path.is_file() and zipfile.is_zipfile(path):  # a skops model; an HDF5 store is never a zip file
        _model_info(path, as_json)
        return
    with reported(), FeatureStore(store, plan) as fs:
        data = fs.info()
        failures = fs.failures
    if as_json:
        data["failure_list"] = [{"id": f.id, "reason": f.reason} for f in failures] if show_failures else None
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("\n".join(_info_lines(data)))
    if show_failures:
        for f in failures:
            click.echo(f"failed      {f.id}: {f.reason}")


def _info_lines(data: dict[str, Any]) -> list[str]:
    spec = data["spec"]
    pre = spec["preprocessing"]
    lines = [
        f"store       {data['path']}  ({data['format']}, created {data['created_at']})",
        f"key         {data['key']}",
        f"backbone    {spec['backbone']}  weights {spec['weights']}  sha256 {spec['weights_sha256'][:16]}",
        *(f"layer       {layer}: {shape}" for layer, shape in data["features"].items()),
        f"pooling     {spec['pool']}   amp {spec['amp']}   tta {spec['tta']}   decode {spec.get('decode', 'exact')}   "
        f"extractor v{spec['extractor_version']}",
        f"preprocess  resize {pre['resize_size']} ({pre['interpolation']}), "
        f"crop {pre['input_size'][0]}x{pre['input_size'][1]}, "
        f"mean {pre['mean']}, std {pre['std']}",
        f"images      {data['rows']} rows; {', '.join(f'{k} {v}' for k, v in data['splits'].items())}; "
        f"{data['classes']} classes; {data['failures']} failed",
        f"source      {data['manifest']['source']}",
        f"splits      {data['manifest']['split_policy']}",
        f"split ids   {', '.join(f'{k} {v}' for k, v in data['manifest']['split_hashes'].items())}",
        f"fingerprint {data['manifest']['fingerprint']}",
    ]
    stats = data["stats"]
    if stats:
        lines.append(
            f"extraction  {stats.get('images', stats.get('images_this_run'))} images in {stats.get('seconds')} s on "
            f"{stats.get('device')} ({stats.get('images_per_second')} images/s)"
            + (f"; resumed, {stats['resumed_rows']} rows from earlier runs" if stats.get("resumed_rows") else "")
        )
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    return lines


def _model_info(path, as_json: bool) -> None:
    """``featx info MODEL.skops``: the classifier, what it was trained on and the commands that use it."""
    from featx.classify.model import load_model

    with reported():
        try:
            model = load_model(path)
        except ValueError as exc:
            raise ValueError(f"{path} is a model file, not a feature store, and cannot be described: {exc}") from None
    meta = model.meta
    if as_json:
        click.echo(json.dumps({"kind": "model", "path": str(path), "score_kind": model.score_kind, **meta}, indent=2))
        return
    settings, spec = meta["classifier"], meta["store_spec"]
    chosen = settings.get("chosen")
    value = f"{settings.get('param') or 'value'} = {chosen:.3g}" if isinstance(chosen, int | float) else "no value"
    trained = meta.get("trained_on", {})
    names = meta["class_names"]
    lines = [
        f"model       {path}  (a `featx train` classifier, created {meta.get('created_at', '?')})",
        f"classifier  {settings.get('preset', settings.get('classifier'))}  {value}"
        + (f" (selected on {trained['selected_on']})" if trained.get("selected_on") else "")
        + f", preprocess {', '.join(settings.get('preprocess') or []) or 'none'}",
        f"scores      {model.score_kind or 'none'}",
        f"trained on  {trained.get('n', '?')} images of {', '.join(trained.get('splits', ['train']))}",
        f"classes     {len(names)}: {', '.join(names[:10])}{' …' if len(names) > 10 else ''}",
        f"features    {spec['backbone']}  layer {meta['layer']}  pool {spec['pool']}  "
        f"(store key {meta.get('store_key', '?')[:12]})",
        "versions    " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        f"use         featx predict IMAGES --model {path}   |   featx evaluate STORE --model {path}",
    ]
    click.echo("\n".join(lines))


def _finetune_info(path, as_json: bool) -> None:
    """``featx info FOLDER`` of ``featx finetune``: the network, its head, its run, and the commands that use it."""
    from featx.finetune.artifacts import read_finetune_meta

    with reported():
        meta = read_finetune_meta(path)
    if as_json:
        click.echo(json.dumps({"kind": "finetuned", "path": str(path), **meta}, indent=2))
        return
    names, head, config = meta["class_names"], meta["head"], meta.get("config", {})
    phases = ", ".join(f"{p['freeze']}:{p['epochs']}:{p['lr']}" for p in config.get("phases", []))
    lines = [
        f"fine-tuned  {path}  ({meta['architecture']} from {meta['backbone']})",
        f"head        {head['name']}  hidden {head['hidden'] or 'none (linear)'}  dropout {head['dropout']}",
        f"run         phases {phases}  best epoch {meta.get('best_epoch')}"
        + (f"  base rate {meta['lr_chosen']:.3g}" if isinstance(meta.get("lr_chosen"), int | float) else "")
        + (f"  head from {meta['init_head']}" if meta.get("init_head") else ""),
        f"classes     {len(names)}: {', '.join(names[:10])}{' …' if len(names) > 10 else ''}",
        f"use         featx predict IMAGES --model {path}",
    ]
    if meta.get("extract_with"):
        lines.append(f"            featx extract SOURCE --backbone {path}   (features of the fine-tuned network)")
    click.echo("\n".join(lines))


@click.command()
@click.option(
    "--source",
    type=click.Choice(["featx", "torchvision", "timm"]),
    default=None,
    help="Only this source (timm lists ~1,800 weights: combine with --filter).",
)
@click.option("--filter", "pattern", default=None, help="Shell pattern on the model name, e.g. 'resnet*'.")
@click.option(
    "--layers",
    "layers_of",
    default=None,
    metavar="BACKBONE",
    help="List the layers of one backbone instead (builds its network; no weights are downloaded).",
)
def backbones(source, pattern, layers_of) -> None:
    """List backbones (and their weight tags; * marks weights usable offline), or one backbone's layers."""
    from featx.backbones.loading import build_architecture
    from featx.backbones.names import list_backbones

    with reported():
        if layers_of:
            net = build_architecture(layers_of)
            click.echo(f"{net.name}: stage outputs (good starting points): {', '.join(net.suggested_layers())}")
            click.echo(f"penultimate = {net.penultimate_node()}")
            click.echo("all layers (FX node names):")
            for name in net.layer_names():
                click.echo(f"  {name}")
            return
        rows = list_backbones(source, pattern)
    timm_rows = [r for r in rows if r.name.startswith("timm:")]
    for row in rows:
        if row.name.startswith("timm:") and source != "timm" and pattern is None:
            continue
        tags = ", ".join(f"{t}*" if t in row.cached_tags else t for t in row.tags)
        text = f"{row.name:42s} {tags}"
        if row.description:
            text += f"  — {row.description}"
        click.echo(text)
    if timm_rows and source != "timm" and pattern is None:
        click.echo(
            f"... and {len(timm_rows)} timm models with pretrained weights: "
            "`featx backbones --source timm --filter 'convnext*'`"
        )
    click.echo("* = weights usable offline here (built in or already cached). Write SOURCE:NAME[.TAG].")
