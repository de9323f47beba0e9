"""Commands of batch jobs: ``run`` (a pipeline file) and ``compare`` (its results side by side)."""

from __future__ import annotations

import sys

import click

from featx.cli._shared import fail, name_values, no_progress_option, reported

__all__ = ["compare", "run"]


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, callback=name_values("data=/datasets"), help="Set a [vars] value: NAME=VALUE."
)
@click.option("--only", multiple=True, help="Run only tasks or cells matching this pattern (and what they need).")
@click.option("--force", is_flag=True, help="Redo the selected cells even when their results are cached.")
@click.option("--dry-run", is_flag=True, help="Print the plan: what is cached and what would run.")
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run the classifier cells' searches on the Dask scheduler at ADDRESS (tcp://HOST:8786); needs featx[dask].",
)
@no_progress_option(help=None)
def run(pipeline, overrides, only, force, dry_run, scheduler, no_progress) -> None:
    """Run a pipeline (datasets × backbones × classifiers, + fine-tuning) as a cached, resumable batch job."""
    from featx.jobs.runner import run as run_job
    from featx.jobs.schema import load_job

    kept = "finished cells, extracted batches and fine-tuning checkpoints are kept"
    with reported(kept, also=(ModuleNotFoundError,)):
        job = load_job(pipeline, overrides)
        summary = run_job(job, only=only, force=force, dry_run=dry_run, progress=not no_progress, scheduler=scheduler)
    for task in summary.tasks:
        note = f"  ({task.message})" if task.message else ""
        click.echo(f"{task.status:>8}  {task.id}{note}")
    counts = ", ".join(
        f"{summary.count(s)} {s}" for s in ("done", "cached", "planned", "failed", "skipped") if summary.count(s)
    )
    where = " (a dry run writes nothing)" if dry_run else f"; log: {job.out / 'run.log'}"
    click.echo(f"{job.name}: {counts} in {summary.seconds:.1f} s{where}")
    if dry_run:
        click.echo(_cost_line(job, summary.tasks))
    if not dry_run:
        _compare([job.out], job.out, job.margin)
    if summary.failed:
        sys.exit(1)


def _cost_line(job, tasks) -> str:
    """What the plan costs in runs: repeats × seeds multiply the classifier cells and, above all, the fine-tunes."""
    todo = [t for t in tasks if t.status == "planned"]
    kinds = {k: sum(t.kind == k for t in todo) for k in ("extract", "classify", "finetune")}
    repeats = ", ".join(f"{d.name} × {d.repeats}" for d in job.datasets if d.repeats > 1)
    return (
        f"to run: {kinds['extract']} extractions, {kinds['classify']} classifier cells, {kinds['finetune']} fine-tunes"
        + (f" (split repeats: {repeats}; each fine-tune runs once per repeat and seed)" if repeats else "")
    )


def _compare(folders, out_dir, margin: float) -> None:
    from featx.jobs.report import collect, format_table, write_report

    try:
        rows = [row for folder in folders for row in collect(folder, root=out_dir)]
    except FileNotFoundError as exc:
        click.echo(str(exc), err=True)
        return
    click.echo("")
    click.echo(format_table(rows, margin))
    paths = write_report(out_dir, margin=margin, rows=rows)
    click.echo(f"\nreport: {paths['markdown']} and {paths['html']} (plots in {paths['plots']})")


def _margin_points(ctx, param, value):
    if value is None:
        return None
    if not 0 < value < 100:
        raise click.BadParameter(f"must be in points of accuracy between 0 and 100 (1 = 1 pt); got {value:g}")
    return value / 100


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--margin",
    type=float,
    default=None,
    callback=_margin_points,
    metavar="PT",
    help="Margin of practical equivalence of the decision, in points of accuracy (default: the pipeline's, else 1).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the report goes (default: the folder, when one is given; needed for several).",
)
def compare(folders, margin, out_dir) -> None:
    """Compare every result under FOLDERS side by side (rows grouped by the images they were tested on, however
    the paths were spelled); print the decision and write report.md, report.html and plots.

    \b
    featx compare runs/quickstart
    featx compare runs/svm runs/ft --out runs/compare --margin 2
    """
    from pathlib import Path

    from featx.jobs.report import collect, recorded_margin

    if out_dir is None:
        if len(folders) > 1:
            raise click.UsageError("several folders: say where the report goes with --out DIR")
        out_dir = folders[0]
    try:
        for folder in folders:
            collect(folder)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _compare(folders, out_dir, margin if margin is not None else recorded_margin(folders[0]))
