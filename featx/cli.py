"""The ``featx`` command: a thin shell over the library; each command calls one library function.

Exit codes: 0 success, 1 error (bad input, with a message saying how to fix it), 3 finished but with
more failed images than ``--max-failures`` allows, 130 interrupted (work done so far is kept).
"""

from __future__ import annotations

import json
import logging
import sys

import click

from featx import __version__
from featx.spec import DEFAULT_BACKBONE, DEFAULT_MAX_PIXELS, POOLS

EXIT_TOO_MANY_FAILURES = 3
EXIT_INTERRUPTED = 130


def _interrupted(kept: str) -> None:
    click.secho(f"interrupted: {kept}; run the same command again to resume.", fg="yellow", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _fail(exc: BaseException) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """featx: frozen convnet features for transfer learning, cached with provenance.

    \b
    featx extract digits --out digits.h5     embed the built-in demo with the offline backbone
    featx info digits.h5                      show how a store was made
    featx backbones --source torchvision      list backbones
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("featx").setLevel(logging.DEBUG if verbose else logging.INFO)


def _validate_max_failures(ctx, param, value):
    from featx.extract.engine import MaxFailures

    try:
        return MaxFailures.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _validate_shard(ctx, param, value):
    if value is None:
        return None
    from featx.extract.sharded import Shard

    try:
        return Shard.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
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
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="avg",
    show_default=True,
    help="Pooling of spatial feature maps.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the features.",
)
@click.option(
    "--amp",
    type=click.Choice(["auto", "bf16", "fp16", "none"]),
    default="auto",
    show_default=True,
    help="Autocast precision (auto: bf16/fp16 on CUDA, none on CPU).",
)
@click.option(
    "--tta",
    type=click.Choice(["none", "flip"]),
    default="none",
    show_default=True,
    help="Test-time augmentation: flip averages the features of each image and its mirror.",
)
@click.option(
    "--decode",
    type=click.Choice(["exact", "fast"]),
    default="exact",
    show_default=True,
    help="fast: decode big JPEGs at a reduced scale and resize only the crop region (slightly different pixels).",
)
@click.option(
    "--workers", type=click.IntRange(min=0), default=None, help="Decoding processes [default: CPU cores, max 8]."
)
@click.option(
    "--max-failures",
    default="0",
    show_default=True,
    callback=_validate_max_failures,
    help="Failed images tolerated before the exit code is 3: a count, a percentage like 1%, or inf.",
)
@click.option(
    "--fingerprint",
    type=click.Choice(["stat", "content"]),
    default="stat",
    show_default=True,
    help="How images enter the cache key: path/size/mtime, or content hashes.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the carved test split, if one is needed.")
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of each class carved off as the test split when the source has none.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Images with more pixels are recorded as failures (decompression-bomb guard).",
)
@click.option("--overwrite", is_flag=True, help="Replace a store (or interrupted job) made with another spec.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Store path (.h5) [default: in the featx cache, named by the cache key].",
)
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="torch.compile the network (features within float tolerance of eager); auto: CPU jobs of 20,000+ images.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--shard",
    default=None,
    callback=_validate_shard,
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
    source,
    backbone,
    layers,
    pool,
    batch_size,
    device,
    dtype,
    amp,
    tta,
    decode,
    workers,
    max_failures,
    fingerprint,
    seed,
    test_fraction,
    max_pixels,
    overwrite,
    out,
    compile_mode,
    no_progress,
    shard,
    distributed,
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

    try:
        if distributed is None:  # on by default under torchrun with several processes, unless one shard is asked for
            env = TorchrunEnv.detect()
            distributed = shard is None and env is not None and env.world_size > 1
        result = run_extract(
            source,
            backbone,
            layers=layers,
            pool=pool,
            out=out,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            amp=amp,
            tta=tta,
            decode=decode,
            workers=workers,
            max_failures=str(max_failures),
            overwrite=overwrite,
            fingerprint=fingerprint,
            seed=seed,
            test_fraction=test_fraction,
            max_pixels=max_pixels,
            progress=not no_progress,
            compile_mode=compile_mode,
            shard=shard,
            distributed=distributed,
        )
    except KeyboardInterrupt:
        _interrupted("the batches written so far are kept")
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
    if result.shard is not None:
        _print_shard_summary(result)
        return
    if result.rank not in (None, 0):
        return  # rank 0 reports the whole job
    _print_summary(result)
    if result.too_many_failures:
        click.secho(
            f"{result.n_failed} images failed, more than --max-failures {result.max_failures} allows "
            "(the store is complete; its failures list says why each failed)",
            fg="red",
            err=True,
        )
        sys.exit(EXIT_TOO_MANY_FAILURES)


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
    for failure in result.failures[:10]:
        click.echo(f"  failed: {failure.id}: {failure.reason}", err=True)
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
    for failure in result.failures[:10]:
        click.echo(f"  failed: {failure.id}: {failure.reason}", err=True)
    if len(result.failures) > 10:
        click.echo(f"  ... and {len(result.failures) - 10} more (`featx info STORE --failures`)", err=True)


@main.command()
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
@click.option(
    "--max-failures",
    default="0",
    show_default=True,
    callback=_validate_max_failures,
    help="Failed images tolerated (over all shards) before the exit code is 3.",
)
def join(store, count, keep_shards, overwrite, max_failures) -> None:
    """Join the shards in STORE.shards/ (from torchrun or --shard runs) into STORE.

    Refuses, naming the fix, when a shard is missing, unfinished, or from another job or shard count;
    nothing is deleted then.
    """
    from featx.extract.sharded import join_shards

    try:
        result = join_shards(store, count=count, overwrite=overwrite, keep_shards=keep_shards)
    except KeyboardInterrupt:
        _interrupted("the shards are kept")
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
    if result.cached:
        click.echo(f"{result.path} is already joined (key {result.key[:12]}); nothing to do")
    else:
        click.echo(
            f"joined {result.n_shards} shards into {result.path}: {result.n_done} of {result.n_images} images, "
            f"{result.n_failed} failed ({result.seconds:.1f} s)"
        )
    for failure in result.failures[:10]:
        click.echo(f"  failed: {failure.id}: {failure.reason}", err=True)
    if max_failures.exceeded(result.n_failed, result.n_images):
        click.secho(
            f"{result.n_failed} images failed, more than --max-failures {max_failures} allows "
            "(the store is complete; its failures list says why each failed)",
            fg="red",
            err=True,
        )
        sys.exit(EXIT_TOO_MANY_FAILURES)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the provenance as JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="List every failed image with its reason.")
def info(store, as_json, show_failures) -> None:
    """Show how STORE was made: backbone, weights, layers, preprocessing, images, versions."""
    from featx.store.reader import FeatureStore

    try:
        with FeatureStore(store) as fs:
            data = fs.info()
            failures = fs.failures
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
    if as_json:
        data["failure_list"] = [{"id": f.id, "reason": f.reason} for f in failures] if show_failures else None
        click.echo(json.dumps(data, indent=2))
        return
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
        f"fingerprint {data['manifest']['fingerprint']}",
    ]
    stats = data["stats"]
    if stats:
        lines.append(
            f"extraction  {stats.get('images_this_run')} images in {stats.get('seconds')} s on "
            f"{stats.get('device')} ({stats.get('images_per_second')} images/s)"
        )
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    click.echo("\n".join(lines))
    if show_failures:
        for f in failures:
            click.echo(f"failed      {f.id}: {f.reason}")


@main.command()
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
    help="List the layers of one backbone instead (loads it).",
)
def backbones(source, pattern, layers_of) -> None:
    """List backbones (and their weight tags; * marks weights usable offline), or one backbone's layers."""
    from featx.backbones.loading import load_backbone
    from featx.backbones.names import list_backbones

    try:
        if layers_of:
            net = load_backbone(layers_of)
            click.echo(f"{net.name}: stage outputs (good starting points): {', '.join(net.suggested_layers())}")
            click.echo(f"penultimate = {net.penultimate_node()}")
            click.echo("all layers (FX node names):")
            for name in net.layer_names():
                click.echo(f"  {name}")
            return
        rows = list_backbones(source, pattern)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
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


def _positive_or_auto(ctx, param, value):
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number") from None
    if number <= 0:
        raise click.BadParameter(f"{value!r} must be positive")
    return number


def _float_list(ctx, param, value):
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 0.01,0.1,1,10") from None
    if not values or min(values) <= 0:
        raise click.BadParameter("give one or more positive numbers")
    return values


def _shots(ctx, param, value):
    if value is None:
        return None
    out = []
    for part in value.split(","):
        part = part.strip()
        if part == "all":
            out.append("all")
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise click.BadParameter(f"{part!r}: shots are positive integers or 'all', e.g. 1,2,5,10,all")
    return out


def _key_values(ctx, param, value):
    params = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write NAME=VALUE, e.g. loss=log_loss")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


@main.command()
@click.argument("store", type=click.Path())
@click.option(
    "--classifier",
    "-c",
    default="svm",
    show_default=True,
    help="svm, logreg, sgd, ridge, knn, or an import path such as sklearn.svm.SVC.",
)
@click.option("--C", "C", default=None, callback=_positive_or_auto, help="C for svm/logreg: auto (search) or a value.")
@click.option("--alpha", default=None, callback=_positive_or_auto, help="alpha for sgd/ridge: auto or a value.")
@click.option("--neighbors", default=None, callback=_positive_or_auto, help="k for knn: auto or a value.")
@click.option("--grid", default=None, callback=_float_list, help="Search grid, e.g. 0.01,0.1,1,10 [default: preset's].")
@click.option(
    "--preprocess",
    default=None,
    help="Comma-separated steps: l2, standard, pca:K, none [default: standard; l2 for knn].",
)
@click.option(
    "--cv",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Folds of the stratified CV (used when the store has no val split).",
)
@click.option(
    "--jobs", "-j", type=int, default=-1, show_default=True, help="Parallel jobs for the search (-1: all cores)."
)
@click.option(
    "--class-weight", type=click.Choice(["balanced"]), default=None, help="Weight classes by inverse frequency."
)
@click.option("--scoring", type=click.Choice(["accuracy", "balanced_accuracy"]), default="accuracy", show_default=True)
@click.option("--param", "params", multiple=True, callback=_key_values, help="Extra estimator parameter NAME=VALUE.")
@click.option("--layer", default=None, help="Store layer to train on [default: its first].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out-of-core",
    is_flag=True,
    help="sgd only: stream the store through partial_fit in shuffled blocks (bounded memory).",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run the search's folds on the Dask scheduler at ADDRESS (tcp://HOST:8786); needs featx[dask].",
)
@click.option("--shots", default=None, callback=_shots, help="Learning curve: images per class, e.g. 1,2,5,10,all.")
@click.option("--draws", type=click.IntRange(min=1), default=5, show_default=True, help="Seeded draws per shot count.")
@click.option(
    "--out",
    "-o",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for model.skops and results.json.",
)
def train(
    store,
    classifier,
    C,
    alpha,
    neighbors,
    grid,
    preprocess,
    cv,
    jobs,
    class_weight,
    scoring,
    params,
    layer,
    seed,
    out_of_core,
    scheduler,
    shots,
    draws,
    out_dir,
) -> None:
    """Train a classifier on the features in STORE, choosing its hyper-parameter on the training data only."""
    from featx.classify.config import ClassifierConfig
    from featx.classify.presets import get_preset, parse_preprocess
    from featx.classify.training import train as run_train

    try:
        preset = get_preset(classifier)
        given = {"C": C, "alpha": alpha, "n_neighbors": neighbors}
        option = {"C": "--C", "alpha": "--alpha", "n_neighbors": "--neighbors"}
        for name, value in given.items():
            if value is not None and name != preset.param:
                hint = f"use {option[preset.param]}" if preset.param in option else "it has none to set"
                raise ValueError(
                    f"{option[name]} does not apply to {preset.name}, whose hyper-parameter is "
                    f"{preset.param or 'none'}: {hint}"
                )
        value = given.get(preset.param) or "auto"
        config = ClassifierConfig(
            classifier=classifier,
            value=value,
            grid=grid,
            preprocess=None if preprocess is None else tuple(parse_preprocess(preprocess)),
            cv=cv,
            class_weight=class_weight,
            scoring=scoring,
            params=tuple(sorted(params.items())),
            layer=layer,
            seed=seed,
            out_of_core=out_of_core,
        )
        config.validate()
        _, results = run_train(
            store, config, n_jobs=jobs, out_dir=out_dir, shots=shots, draws=draws, scheduler=scheduler
        )
    except (ValueError, FileNotFoundError, RuntimeError, OSError, ModuleNotFoundError) as exc:
        _fail(exc)
    _print_results(results)
    click.echo(f"wrote {out_dir}/model.skops and {out_dir}/results.json")


def _print_results(results) -> None:
    search = results.get("search")
    clf = results["classifier"]
    if search:
        click.echo(f"{clf['preset']}: {search['param']} chosen by {search['scheme']} in {search['seconds']:.1f} s")
        for point in search["curve"]:
            mark = "  <- chosen" if point["value"] == search["best"] else ""
            click.echo(f"  {search['param']}={point['value']:<10g} {point['mean']:.4f} ± {point['std']:.4f}{mark}")
    elif clf.get("param"):
        click.echo(f"{clf['preset']}: {clf['param']}={clf['chosen']:g} (fixed)")
    test = results.get("test")
    if test:
        _print_metrics(test)
    for point in results.get("few_shot") or []:
        click.echo(
            f"  {point['shots']!s:>4} per class: {point['mean']:.4f} ± {point['std']:.4f} ({point['draws']} draws)"
        )


def _print_metrics(test) -> None:
    lo, hi = test["accuracy_ci95"]
    top5 = f", top-5 {test['top5_accuracy']:.4f}" if test.get("top5_accuracy") is not None else ""
    click.echo(
        f"{test.get('split', 'test')} ({test['n']} images): accuracy {test['accuracy']:.4f} "
        f"[95% CI {lo:.4f}–{hi:.4f}], balanced {test['balanced_accuracy']:.4f}, "
        f"macro F1 {test['macro_f1']:.4f}{top5}"
    )


@main.command()
@click.argument("store", type=click.Path())
@click.option("--model", "-m", "model_path", type=click.Path(dir_okay=False), required=True)
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option(
    "--trust", is_flag=True, help="Load model files containing types that could run code (only if you trust them)."
)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as JSON.")
def evaluate(store, model_path, split, trust, out) -> None:
    """Score a trained model on STORE's test split (refused if STORE's features were made differently)."""
    from featx.classify.model import load_model
    from featx.classify.training import evaluate_model
    from featx.results import write_results
    from featx.store.reader import FeatureStore

    try:
        model = load_model(model_path, trust=trust)
        with FeatureStore(store) as fs:
            metrics = evaluate_model(model, fs, split=split)
        if out:
            write_results(out, metrics)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
    _print_metrics(metrics)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "-m",
    "model_path",
    type=click.Path(),
    required=True,
    help="A model.skops from `featx train`, or a `featx finetune --out` folder.",
)
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--trust", is_flag=True, help="Load model files containing types that could run code (only if you trust them)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def predict(images, model_path, top_k, device, batch_size, trust, as_json) -> None:
    """Classify IMAGES end to end: the backbone is rebuilt from the model's record (f then g, or f')."""
    from pathlib import Path

    from featx.classify.model import load_model
    from featx.predict import predict_images

    try:
        if Path(model_path).is_dir():  # a `featx finetune --out` folder
            from featx.predict import predict_finetuned

            predictions = predict_finetuned(list(images), model_path, top_k=top_k, device=device, batch_size=batch_size)
        else:
            model = load_model(model_path, trust=trust)
            predictions = predict_images(list(images), model, top_k=top_k, device=device, batch_size=batch_size)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
    failed = 0
    for p in predictions:
        if as_json:
            click.echo(
                json.dumps({"path": p.path, "class": p.label, "score": p.score, "top_k": p.top_k, "error": p.error})
            )
        elif p.error:
            click.echo(f"{p.path}\terror: {p.error}", err=True)
        else:
            ranked = ", ".join(f"{name} {score:.3f}" for name, score in p.top_k)
            click.echo(f"{p.path}\t{p.label}\t{p.score if p.score is not None else ''}\t{ranked}")
        failed += p.error is not None
    if failed:
        click.secho(f"{failed} of {len(predictions)} images could not be read", fg="yellow", err=True)
        sys.exit(EXIT_TOO_MANY_FAILURES)


@main.command()
@click.argument("source")
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True)
@click.option(
    "--phases",
    default="head:3:1e-3,top2:5:1e-4,all:5:1e-5",  # featx.finetune.DEFAULT_PHASES (not imported: torch)
    show_default=True,
    help="FREEZE:EPOCHS:LR,… with FREEZE = head, topK or all; or a .toml file of [[phase]] tables.",
)
@click.option(
    "--init-head",
    type=click.Path(dir_okay=False),
    default=None,
    help="LP-FT: start the head from a `featx train -c logreg` model.skops on this backbone's features.",
)
@click.option("--trust", is_flag=True, help="Trust --init-head files holding types that could run code.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
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
    "--warmup",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of each phase's steps spent warming up.",
)
@click.option("--hidden", default="", help="Hidden sizes of an MLP head, e.g. 512,256 [default: linear head].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=None, help="End a phase after N epochs without gain.")
@click.option("--metric", type=click.Choice(["val_accuracy", "val_loss"]), default="val_accuracy", show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of train used for validation when the source has no val split.",
)
@click.option(
    "--crop-scale",
    default="0.25,1.0",
    show_default=True,
    help="Area range MIN,MAX of the training random resized crop.",
)
@click.option(
    "--update-bn-stats",
    is_flag=True,
    help="Let unfrozen BatchNorm layers update their running statistics (kept fixed by default).",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "none"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Start afresh if --out holds a run with other settings.")
@click.option("--no-progress", is_flag=True)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True)
def finetune(
    source,
    backbone,
    phases,
    init_head,
    trust,
    batch_size,
    optimizer,
    weight_decay,
    label_smoothing,
    clip_grad,
    backbone_lr_mult,
    warmup,
    hidden,
    dropout,
    patience,
    metric,
    val_fraction,
    crop_scale,
    update_bn_stats,
    device,
    amp,
    workers,
    seed,
    overwrite,
    no_progress,
    out_dir,
) -> None:
    """Fine-tune a backbone on SOURCE in phases; resumable; tested on the same split as `featx train`.

    \b
    On several GPUs or nodes, launch it with torchrun (DistributedDataParallel; --batch-size is global):
    torchrun --nproc-per-node 4 -m featx finetune SOURCE --out DIR …
    """
    from featx._runtime.dist import env_rank
    from featx.finetune.config import FinetuneConfig, parse_phases
    from featx.finetune.trainer import finetune as run_finetune

    if env_rank() != 0:  # under torchrun, rank 0 tells the story
        logging.getLogger("featx").setLevel(logging.WARNING)

    try:
        try:
            hidden_sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError:
            raise ValueError(f"--hidden {hidden!r}: give comma-separated layer sizes, e.g. 512,256") from None
        try:
            low, high = (float(v) for v in crop_scale.split(","))
        except ValueError:
            raise ValueError(f"--crop-scale {crop_scale!r}: give MIN,MAX, e.g. 0.25,1.0") from None
        config = FinetuneConfig(
            phases=tuple(parse_phases(phases)),
            batch_size=batch_size,
            optimizer=optimizer,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            clip_grad=clip_grad,
            backbone_lr_mult=backbone_lr_mult,
            warmup=warmup,
            hidden=hidden_sizes,
            dropout=dropout,
            patience=patience,
            metric=metric,
            val_fraction=val_fraction,
            seed=seed,
            update_bn_stats=update_bn_stats,
            crop_scale=(low, high),
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
        )
    except KeyboardInterrupt:
        _interrupted("the last epoch's checkpoint is kept")
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        _fail(exc)
    if env_rank() != 0:
        return
    for c in results["curves"]:
        click.echo(
            f"  epoch {c['epoch']:>3} {c['freeze']:>5}: train loss {c['train_loss']:.4f}, val accuracy "
            f"{c['val_accuracy']:.4f}, {c['images_per_second']:.1f} images/s"
        )
    click.echo(f"best epoch {results['best_epoch']}")
    if results["test"]:
        _print_metrics(results["test"])
    click.echo(f"wrote {out_dir}/model.safetensors, finetune.json and results.json")


def _set_vars(ctx, param, value):
    out = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write NAME=VALUE, e.g. data=/datasets")
        out[key] = raw
    return out


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, callback=_set_vars, help="Set a [vars] value: NAME=VALUE.")
@click.option("--only", multiple=True, help="Run only tasks or cells matching this pattern (and what they need).")
@click.option("--force", is_flag=True, help="Redo the selected cells even when their results are cached.")
@click.option("--dry-run", is_flag=True, help="Print the plan: what is cached and what would run.")
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run the classifier cells' searches on the Dask scheduler at ADDRESS (tcp://HOST:8786); needs featx[dask].",
)
@click.option("--no-progress", is_flag=True)
def run(pipeline, overrides, only, force, dry_run, scheduler, no_progress) -> None:
    """Run a pipeline (datasets × backbones × classifiers, + fine-tuning) as a cached, resumable batch job."""
    from featx.jobs.runner import run as run_job
    from featx.jobs.schema import load_job

    try:
        job = load_job(pipeline, overrides)
        summary = run_job(job, only=only, force=force, dry_run=dry_run, progress=not no_progress, scheduler=scheduler)
    except KeyboardInterrupt:
        _interrupted("finished cells, extracted batches and fine-tuning checkpoints are kept")
    except (ValueError, FileNotFoundError, RuntimeError, OSError, ModuleNotFoundError) as exc:
        _fail(exc)
    for task in summary.tasks:
        note = f"  ({task.message})" if task.message else ""
        click.echo(f"{task.status:>8}  {task.id}{note}")
    counts = ", ".join(
        f"{summary.count(s)} {s}" for s in ("done", "cached", "planned", "failed", "skipped") if summary.count(s)
    )
    click.echo(f"{job.name}: {counts} in {summary.seconds:.1f} s; log: {job.out / 'run.log'}")
    if not dry_run:
        _compare(job.out)
    if summary.failed:
        sys.exit(1)


def _compare(out_dir) -> None:
    from featx.jobs.report import collect, format_table, write_report

    try:
        rows = collect(out_dir)
    except FileNotFoundError as exc:
        click.echo(str(exc), err=True)
        return
    click.echo("")
    click.echo(format_table(rows))
    paths = write_report(out_dir)
    click.echo(f"\nreport: {paths['markdown']} and {paths['html']} (plots in {paths['plots']})")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
def compare(out_dir) -> None:
    """Compare every result under OUT_DIR side by side; write report.md, report.html and plots."""
    try:
        from featx.jobs.report import collect

        collect(out_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc)
    _compare(out_dir)


if __name__ == "__main__":  # pragma: no cover
    main()
