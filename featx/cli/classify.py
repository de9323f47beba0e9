"""Commands of the classical stage: ``train``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from featx.cli._shared import (
    EXIT_TOO_MANY_FAILURES,
    batch_size_option,
    device_option,
    name_values,
    print_metrics,
    reported,
    split_plan_options,
    trust_option,
)

__all__ = ["evaluate", "predict", "train"]

_TRUST_HELP = "Load model files containing types that could run code (only if you trust them)."
# The command-line flag of each preset hyper-parameter.
_HYPER_FLAGS = {"C": "--C", "alpha": "--alpha", "n_neighbors": "--neighbors"}


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
            raise ValueError(
                f"{_HYPER_FLAGS[name]} does not apply to {preset.name}, whose hyper-parameter is "
                f"{preset.param or 'none'}: {hint}"
            )
    return given.get(preset.param) or "auto"


@click.command()
@click.argument("store", type=click.Path())
@click.option(
    "--classifier",
    "-c",
    default="svm",
    show_default=True,
    help="svm, logreg, sgd, ridge, knn, chance, or an import path such as sklearn.svm.SVC.",
)
@click.option("--C", "C", default=None, callback=_positive_or_auto, help="C for svm/logreg: auto (search) or a value.")
@click.option("--alpha", default=None, callback=_positive_or_auto, help="alpha for sgd/ridge: auto or a value.")
@click.option("--neighbors", default=None, callback=_positive_or_auto, help="k for knn: auto or a value.")
@click.option("--grid", default=None, callback=_float_list, help="Search grid, e.g. 0.01,0.1,1,10 [default: preset's].")
@click.option(
    "--preprocess",
    default=None,
    # Written out, not read from PRESETS (importing featx.classify costs a second); a test keeps it true.
    help="Comma-separated steps: l2, standard, pca:K, none [default: the preset's: svm: l2, logreg: standard, "
    "sgd: standard, ridge: standard, knn: l2, chance: none; standard for an import path].",
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
@click.option(
    "--param",
    "params",
    multiple=True,
    callback=name_values("loss=log_loss", _json_or_text),
    help="Extra estimator parameter NAME=VALUE.",
)
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
@split_plan_options()
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
    params,
    jobs,
    scheduler,
    shots,
    draws,
    out_dir,
    plan,
    **settings,
) -> None:
    """Train a classifier on the features in STORE: fit on train, its hyper-parameter chosen on val.

    The splits are STORE's split plan (--split-seed, --val-fraction, --test-fraction): the same plan gives a
    fine-tune (`featx finetune`) the same train, val and test images.
    """
    from featx.classify.config import ClassifierConfig
    from featx.classify.presets import get_preset, parse_preprocess
    from featx.classify.training import train as run_train

    with reported(also=(ModuleNotFoundError,)):
        config = ClassifierConfig(
            classifier=classifier,
            value=_hyper_value(get_preset(classifier), {"C": C, "alpha": alpha, "n_neighbors": neighbors}),
            grid=grid,
            preprocess=None if preprocess is None else tuple(parse_preprocess(preprocess)),
            params=tuple(sorted(params.items())),
            **settings,  # cv, class_weight, scoring, layer, seed, out_of_core: ClassifierConfig's own names
        )
        config.validate()
        _, results = run_train(
            store, config, plan=plan, n_jobs=jobs, out_dir=out_dir, shots=shots, draws=draws, scheduler=scheduler
        )
    _print_results(results)
    click.echo(f"wrote {out_dir}/model.skops and {out_dir}/results.json")


def _print_results(results) -> None:
    search = results.get("search")
    clf = results["classifier"]
    split = results.get("split")
    if split:
        sizes = ", ".join(f"{name} {n}" for name, n in split["sizes"].items())
        click.echo(f"splits: {sizes} ({split['policy']}); fit on train, chosen on val")
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
@click.option("--model", "-m", "model_path", type=click.Path(dir_okay=False), required=True)
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
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
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@device_option()
@batch_size_option()
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
