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


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
def compare(out_dir) -> None:
    """Compare every result under OUT_DIR side by side; write report.md, report.html and plots."""
    try:
        from featx.jobs.report import collect

        collect(out_dir)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    _compare(out_dir)
