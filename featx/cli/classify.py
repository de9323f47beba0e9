"""Commands of the classical stage: ``train``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from featx._runtime.params import options_of
from featx.classify.config import ClassifierConfig, TrainRun
from featx.cli._shared import (
    EXIT_TOO_MANY_FAILURES,
    TableValue,
    build,
    device_option,
    name_values,
    out_folder_option,
    print_metrics,
    reported,
    split_plan_options,
    table_option,
    table_options,
    trust_option,
)
from featx.data.splits import FinalFit
from featx.exceptions import InvalidOptionError
from featx.spec import ExtractionOptions

__all__ = ["evaluate", "predict", "train"]

_TRUST_HELP = "Load model files containing types that could run code (only if you trust them)."
# The command-line flag of each preset hyper-parameter.
_HYPER_FLAGS = {"C": "--C", "alpha": "--alpha", "n_neighbors": "--neighbors"}


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _hyper_value(preset: Any, given: dict[str, Any]) -> Any:
    """The value of the preset's hyper-parameter (``auto``: search it); a flag for another preset's is an error."""
    for name, value in given.items():
        if value is not None and name != preset.param:
            hint = f"use {_HYPER_FLAGS[preset.param]}" if preset.param in _HYPER_FLAGS else "it has none to set"
            raise InvalidOptionError(
                "value",
                f"{_HYPER_FLAGS[name]} does not apply to {preset.name}, whose hyper-parameter is "
                f"{preset.param or 'none'}: {hint}",
            )
    return given.get(preset.param) or "auto"


def _hyper_option(flag: str, name: str, help: str) -> Any:
    """``--C``, ``--alpha``, ``--neighbors``: the config's ``value`` under the name of a preset's parameter."""
    spec, _ = options_of(ClassifierConfig)["value"]
    return click.option(flag, name, default=None, type=TableValue("value", spec), help=help)


@click.command()
@click.argument("store", type=click.Path())
@table_options(ClassifierConfig)
@_hyper_option("--C", "C", "C for svm/logreg: auto (search it on val) or a value.")
@_hyper_option("--alpha", "alpha", "alpha for sgd/ridge: auto or a value.")
@_hyper_option("--neighbors", "neighbors", "k for knn: auto or a value.")
@click.option(
    "--param",
    "params",
    multiple=True,
    callback=name_values("loss=log_loss", _json_or_text),
    help=options_of(ClassifierConfig)["params"][0].help,
)
@table_options(TrainRun)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run the search's folds on the Dask scheduler at ADDRESS (tcp://HOST:8786); needs featx[dask].",
)
@split_plan_options()
@table_options(FinalFit)
@out_folder_option("Folder for model.skops and results.json.")
def train(store, C, alpha, neighbors, params, scheduler, out_dir, plan, refit, **settings) -> None:
    """Train a classifier on the features in STORE: fit on train, its hyper-parameter chosen on val.

    The splits are STORE's split plan (--split-seed, --val-fraction, --test-fraction): the same plan gives a
    fine-tune (`featx finetune`) the same train, val and test images.
    """
    from featx.classify.presets import get_preset
    from featx.classify.training import train as run_train

    with reported(also=(ModuleNotFoundError,)):
        value = _hyper_value(get_preset(settings["classifier"]), {"C": C, "alpha": alpha, "n_neighbors": neighbors})
        config = build(ClassifierConfig, settings, value=value, params=tuple(sorted(params.items())))
        run = build(TrainRun, settings)
        _, results = run_train(
            store,
            config,
            plan=plan,
            n_jobs=run.n_jobs,
            out_dir=out_dir,
            shots=None if run.shots is None else list(run.shots),
            draws=run.draws,
            scheduler=scheduler,
            refit=refit,
        )
    _print_results(results)
    click.echo(f"wrote {out_dir}/model.skops and {out_dir}/results.json")


def _print_results(results) -> None:
    search = results.get("search")
    clf = results["classifier"]
    split = results.get("split")
    if split:
        sizes = ", ".join(f"{name} {n}" for name, n in split["sizes"].items())
        click.echo(f"splits: {sizes} ({split['policy']}); {split['rule']}")
    if search:
        click.echo(f"{clf['preset']}: {search['param']} chosen by {search['scheme']} in {search['seconds']:.1f} s")
        for point in sorted(search["curve"] + search.get("refined", []), key=lambda p: p["value"]):
            mark = "  <- chosen" if point["value"] == search["best"] else ""
            click.echo(f"  {search['param']}={point['value']:<10g} {point['mean']:.4f} ± {point['std']:.4f}{mark}")
    elif clf.get("param"):
        click.echo(f"{clf['preset']}: {clf['param']}={clf['chosen']:g} (fixed)")
    test = results.get("test")
    if test:
        print_metrics(test)
    for point in results.get("few_shot") or []:
        click.echo(
            f"  {point['shots']!s:>4} per class: {point['mean']:.4f} ± {point['std']:.4f} ({point['draws']} draws)"
        )


@click.command()
@click.argument("store", type=click.Path())
@click.option(
    "--model",
    "-m",
    "model_path",
    type=click.Path(dir_okay=False),
    required=True,
    help="A model.skops from `featx train`.",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train"]),
    default="test",
    show_default=True,
    help="The split of the model's split plan to score.",
)
@trust_option(_TRUST_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as JSON.")
def evaluate(store, model_path, split, trust, out) -> None:
    """Score a trained model on STORE's test split under the model's split plan (refused if STORE's features
    were made differently)."""
    from featx.classify.model import load_model
    from featx.classify.training import evaluate_model
    from featx.results import write_results
    from featx.store.reader import FeatureStore

    with reported():
        model = load_model(model_path, trust=trust)
        with FeatureStore(store, model.split_plan) as fs:  # the splits the model was trained under
            metrics = evaluate_model(model, fs, split=split)
        if out:
            write_results(out, metrics)
    print_metrics(metrics)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "-m",
    "model_path",
    type=click.Path(),
    required=True,
    help="A model.skops from `featx train`, or a `featx finetune --out` folder.",
)
@click.option(
    "--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="How many classes to list per image."
)
@device_option()
@table_option(ExtractionOptions, "batch_size", default=64, show_default=True)
@trust_option(_TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def predict(images, model_path, top_k, device, batch_size, trust, as_json) -> None:
    """Classify IMAGES end to end: the backbone is rebuilt from the model's record (f then g, or f')."""
    from pathlib import Path

    from featx.classify.model import load_model
    from featx.predict import predict_images

    with reported():
        if Path(model_path).is_dir():  # a `featx finetune --out` folder
            from featx.predict import predict_finetuned

            predictions = predict_finetuned(list(images), model_path, top_k=top_k, device=device, batch_size=batch_size)
        else:
            model = load_model(model_path, trust=trust)
            predictions = predict_images(list(images), model, top_k=top_k, device=device, batch_size=batch_size)
    failed = 0
    if not as_json:
        kind = next((p.score_kind for p in predictions if p.error is None), None) or "score"
        click.echo(f"path\tclass\t{kind}\ttop {top_k} ({kind})")
    for p in predictions:
        if as_json:
            record = {"path": p.path, "class": p.label, "score": p.score, "score_kind": p.score_kind}
            click.echo(json.dumps({**record, "top_k": p.top_k, "error": p.error}))
        elif p.error:
            click.echo(f"{p.path}\terror: {p.error}", err=True)
        else:
            ranked = ", ".join(f"{name} {score:.3f}" for name, score in p.top_k)
            click.echo(f"{p.path}\t{p.label}\t{'' if p.score is None else f'{p.score:.3f}'}\t{ranked}")
        failed += p.error is not None
    if not as_json and any(p.score_kind == "margin" for p in predictions):
        click.echo("margins are the classifier's decision values, not probabilities: larger is surer", err=True)
    if failed:
        click.secho(f"{failed} of {len(predictions)} images could not be read", fg="yellow", err=True)
        sys.exit(EXIT_TOO_MANY_FAILURES)
