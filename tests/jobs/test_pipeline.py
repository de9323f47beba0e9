"""Pipelines: validation with line numbers, cached and resumable runs, isolated failures, the report."""

from __future__ import annotations

import json
import re
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.jobs.planning import plan
from featx.jobs.runner import run
from featx.jobs.schema import JobError, load_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def colours(colour_folder) -> Path:
    return colour_folder


JOB = """
[job]
name = "tiny"
out = "{out}"

[vars]
data = "{data}"

[[datasets]]
name = "colours"
source = "${{data}}"

[[backbones]]
name = "tiny"
backbone = "featx:tiny_test"
layers = ["penultimate", "blocks.2"]

[[classifiers]]
name = "logreg"
classifier = "logreg"
shots = [1, 2, "all"]
draws = 2

[[classifiers]]
name = "knn"
classifier = "knn"
layers = ["penultimate"]

[[finetune]]
name = "lpft"
backbone = "tiny"
phases = "head:1:1e-2"
init_head = "logreg"
batch_size = 8
"""


@pytest.fixture
def job_file(tmp_path, colours) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(out=tmp_path / "out", data=colours))
    return path


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[[datasets]]\nname = "d"\nsource = "digits"\ncolour = 1\n', 4, "unknown key 'colour'"),
        ('[[datasets]]\nname = "d"\nsource = "/no/such/folder"\n', 3, "does not exist"),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\n[[backbones]]\nname = "b"\npool = "median"\n',
            6,
            "unknown pool 'median'. Choose one of avg, max, avgmax, gem, none.",
        ),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\n[[backbones]]\nname = "b"\ndecode = "quick"\n',
            6,
            "unknown decode 'quick'. Choose one of exact, fast, device.",  # featx.spec.check_option's wording
        ),
        ('[[datasets]]\nname = "d"\nsource = "digits"\n[[datasets]]\nname = "d"\nsource = "digits"\n', 5, "used twice"),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\n[[backbones]]\nname = "b"\n[[classifiers]]\n'
            'name = "c"\nclassifier = "svn"\n',
            8,
            "Did you mean: svm",
        ),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\n[[backbones]]\nname = "b"\n[[classifiers]]\nname = "c"\n'
            'classifier = "svm"\n[[finetune]]\nname = "f"\nbackbone = "b"\ninit_head = "c"\n',
            12,
            "logreg",
        ),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\n[[finetune]]\nname = "f"\nphases = "head:1"\n',
            6,
            "FREEZE:EPOCHS:LR",
        ),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\ntest_fraction = 1.5\n',
            4,
            "test_fraction must be a number in (0, 1); got 1.5",
        ),
        ('[[datasets]]\nname = "d"\nsource = "digits"\nval_fraction = 0\n', 4, "val_fraction must be a number"),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\nsplit_seed = -1\n',
            4,
            "split_seed must be an integer of at least 0",
        ),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\nsplit_seed = 1.5\n',
            4,
            "split_seed must be an integer of at least 0",
        ),
        (
            '[[datasets]]\nname = "d"\nsource = "digits"\n[[backbones]]\nname = "b"\n[[classifiers]]\n'
            'name = "c"\nshots = [2, 0]\n',
            8,
            "shots must be a list of 1 or more items, each a positive integer (images per class) or all, "
            "e.g. 1,2,5,10,all (or unset); got [2, 0]",
        ),
        ('[job]\nname = "x"\n[dataset]\nname = "d"\n', 3, "did you mean [datasets]"),
        ('[[datasets]]\nname = "d"\nsource = "${nowhere}"\n', 1, "unknown variable ${nowhere}"),
    ],
)
def test_validation_names_the_line_and_the_fix(tmp_path, text, line, message):
    path = _write(tmp_path, text)
    with pytest.raises(JobError) as err:
        load_job(path)
    assert message in str(err.value)
    assert re.search(rf"bad\.toml:{line}\b", str(err.value)), str(err.value)


def test_plan_covers_the_grid(job_file):
    tasks = plan(load_job(job_file))
    assert [t.id for t in tasks] == [
        "extract/colours/tiny",
        "classify/colours/tiny/penultimate/logreg",
        "classify/colours/tiny/blocks.2/logreg",
        "classify/colours/tiny/penultimate/knn",
        "finetune/colours/lpft",
    ]
    assert tasks[-1].depends == ("classify/colours/tiny/penultimate/logreg",)


def test_run_caches_resumes_and_reports(job_file, tmp_path, monkeypatch):
    job = load_job(job_file)
    first = run(job, progress=False)
    assert [t.status for t in first.tasks] == ["done"] * 5
    out = tmp_path / "out"
    lpft = json.loads((out / "cells" / "colours__lpft" / "results.json").read_text())
    assert lpft["method"].startswith("lp-ft") and lpft["cell"]["dataset"] == "colours"

    import featx.classify.training
    import featx.finetune.trainer
    import featx.store.writer

    def stamps() -> dict[Path, tuple[int, int, int]]:
        files = [p for p in sorted((out / "cells").rglob("*")) + sorted((out / "stores").rglob("*")) if p.is_file()]
        return {p: (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_ino) for p in files}

    def no_work(*args, **kwargs):
        raise AssertionError("a cached cell must not be computed again")

    # The second run does no work: no store is written, nothing is trained, no file of a cell or store changes.
    before = stamps()
    assert len(before) > 10
    with monkeypatch.context() as patched:
        patched.setattr(featx.store.writer.StoreWriter, "__init__", no_work)
        patched.setattr(featx.classify.training, "train", no_work)
        patched.setattr(featx.finetune.trainer, "finetune", no_work)
        second = run(job, progress=False)
    assert [(t.status, t.message) for t in second.tasks] == [("cached", "")] * 5
    assert stamps() == before

    (out / "cells" / "colours__tiny__penultimate__knn" / "results.json").unlink()
    calls = []

    original = featx.classify.training.train

    def counting(*args, **kwargs):
        calls.append(kwargs.get("out_dir"))
        return original(*args, **kwargs)

    monkeypatch.setattr(featx.classify.training, "train", counting)
    third = run(job, progress=False)
    assert [t.status for t in third.tasks] == ["cached", "cached", "cached", "done", "cached"]
    assert len(calls) == 1

    dry = run(job, dry_run=True, force=True, only=["knn"], progress=False)
    assert [(t.id, t.status) for t in dry.tasks] == [
        ("extract/colours/tiny", "cached"),
        ("classify/colours/tiny/penultimate/knn", "planned"),
    ]
    assert (out / "run.log").read_text().count("job tiny") == 3  # a dry run writes no log


def test_a_failing_cell_does_not_lose_the_others(tmp_path, colours):
    path = tmp_path / "job.toml"
    path.write_text(
        JOB.format(out=tmp_path / "out", data=colours)
        + textwrap.dedent(
            """
        [[classifiers]]
        name = "toobig"
        classifier = "logreg"
        preprocess = ["pca:500"]
        layers = ["penultimate"]
        """
        )
    )
    result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
    assert result.exit_code == 1
    assert re.search(r"failed\s+classify/colours/tiny/penultimate/toobig", result.output)
    assert "5 done, 1 failed" in result.output
    assert "logreg · tiny_test · penultimate" in result.output  # the table still comes


class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_compare_writes_an_offline_report_with_valid_plots(job_file, tmp_path):
    run(load_job(job_file), progress=False)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for column in ("test accuracy, % [95% CI]", "balanced acc., %", "macro F1, %", "chosen", "train s", "extract s"):
        assert column in result.output
    assert "each row against the reference (best on val), paired on the same 6 test images" in result.output
    assert result.output.lstrip().startswith("decision:")  # the answer first, before any table
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["margin"] == 0.01 and report["verdicts"][0]["chosen_on"] == "val"
    # The terminal and the report say the same cost: an LP-FT's probe is charged once, not once per document.
    assert report["decisions"][0].split(": ", 1)[1] in result.output
    assert "rule: fit on train, hyper-parameters chosen on val" in result.output
    out = tmp_path / "out"
    page = (out / "report.html").read_text()
    parser = _Structure()
    parser.feed(page)
    # The verdict's table and the results table: a header and 4 methods each.
    assert parser.tags.count("table") == 2 and parser.tags.count("tr") == 10
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "How each row was made" in page and "seed 0" in page
    md = (out / "report.md").read_text()
    assert str(tmp_path) not in md  # paths relative to the report, so it moves with its folder
    assert "(`cells/colours__lpft/results.json`)" in md and "initialised from cells/" in md
    referenced = re.findall(r"\]\((plots/[^)]+)\)", md)
    assert referenced
    for rel in referenced:
        with Image.open(out / rel) as img:
            img.verify()
        assert (out / rel).with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    titles = " ".join(referenced)
    for kind in ("accuracy", "confusion", "learning", "finetune"):
        assert kind in titles


def test_run_restores_the_featx_logger(job_file, monkeypatch):
    import logging

    import featx.jobs.runner

    def quick(job, task, by_id, **kwargs):  # the log's story without the work
        task.status = "done"

    monkeypatch.setattr(featx.jobs.runner, "_execute", quick)
    featx_logger = logging.getLogger("featx")
    before = (featx_logger.level, list(featx_logger.handlers))
    featx_logger.setLevel(logging.WARNING)
    try:
        summary = run(load_job(job_file), progress=False)
        assert featx_logger.level == logging.WARNING and featx_logger.handlers == before[1]
    finally:
        featx_logger.setLevel(before[0])
    assert {t.status for t in summary.tasks} == {"done"}
    out = load_job(job_file).out
    assert "job tiny" in (out / "run.log").read_text()  # the log file still got the INFO story
    record = json.loads((out / "run.json").read_text())
    assert record["dry_run"] is False and [t["id"] for t in record["tasks"]] == [t.id for t in summary.tasks]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # written atomically, no temporary left


def test_a_dry_run_writes_nothing_and_names_each_task_once(job_file, caplog):
    out = load_job(job_file).out
    with caplog.at_level("INFO", logger="featx"):
        result = CliRunner().invoke(main, ["run", str(job_file), "--dry-run", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not out.exists() and "a dry run writes nothing" in result.output  # no run.log, run.json or folders
    tasks = [t.id for t in plan(load_job(job_file))]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for task in tasks:
        assert result.output.count(task) + logged.count(task) == 1, task


def test_compare_over_separate_train_and_finetune_folders_gives_the_decision(colours, tmp_path):
    """The README's CLI path: extract → train → finetune → compare, in folders of their own, grouped by the test
    images they share however the store's path is spelled."""
    runner = CliRunner()
    store = tmp_path / "colours.h5"
    tiny = ["--backbone", "featx:tiny_test"]
    quick = ["--phases", "head:1:1e-2", "--batch-size", "8", "--workers", "0", "--no-progress"]
    steps = [
        ["extract", str(colours), *tiny, "--out", str(store), "--no-progress"],
        ["train", str(store), "-c", "logreg", "--out", str(tmp_path / "svm")],
        ["finetune", str(colours), *tiny, *quick, "--out", str(tmp_path / "ft")],
    ]
    for args in steps:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["compare", str(tmp_path / "svm"), str(tmp_path / "ft"), "--margin", "2"])
    assert result.exit_code == 2 and "--out" in result.output  # several folders: say where the report goes
    both = tmp_path / "both"
    result = runner.invoke(main, ["compare", str(tmp_path / "svm"), str(tmp_path / "ft"), "--out", str(both)])
    assert result.exit_code == 0, result.output
    decision = result.output.strip().split("\n\n")[0]
    assert decision.startswith("decision:") and decision.count("\n") == 1  # one dataset, not one per folder
    assert re.search(r"(Fine-tuning pays|The frozen row is (enough|better)|Inconclusive whether fine-tuning)", decision)
    assert "the compute" in decision
    report = json.loads((both / "report.json").read_text())
    (found,) = report["verdicts"]
    assert found["question"]["outcome"] in ("pays", "enough", "better", "inconclusive")
    assert (both / "report.html").read_text().count("class='decision'") == 1


def test_compare_explains_an_empty_folder(tmp_path):
    result = CliRunner().invoke(main, ["compare", str(tmp_path)])
    assert result.exit_code == 1 and "no featx results.json" in result.output


def test_shipped_pipelines_validate(monkeypatch):
    shared = REPO.parent / "shared" / "data"
    for path in sorted((REPO / "pipelines").glob("*.toml")):
        text = path.read_text()
        if "${data}" in text and not shared.is_dir():
            continue
        job = load_job(path, {"data": str(shared)} if "${data}" in text else None)
        assert job.datasets and plan(job)


def test_a_row_with_several_seeds_runs_one_cell_per_seed_and_reports_their_spread(tmp_path, colours):
    text = JOB.format(out=tmp_path / "out", data=colours).replace(
        'name = "knn"\nclassifier = "knn"', 'name = "sgd"\nclassifier = "sgd"\nseeds = [0, 1, 2]'
    )
    job = load_job(_write(tmp_path, text))
    ids = [t.id for t in plan(job) if "sgd" in t.id]
    assert ids == [f"classify/colours/tiny/penultimate/sgd/seed{s}" for s in (0, 1, 2)]
    run(job, only=["sgd"], progress=False)
    cells = sorted((tmp_path / "out" / "cells").glob("*sgd*"))
    assert [c.name for c in cells] == [f"colours__tiny__penultimate__sgd__seed{s}" for s in (0, 1, 2)]
    seeds = [json.loads((c / "results.json").read_text())["classifier"]["seed"] for c in cells]
    assert seeds == [0, 1, 2]
    from featx.jobs.report import collect, format_table

    table = format_table(collect(tmp_path / "out"))
    rows = [line for line in table.splitlines() if line.startswith("sgd · tiny_test")]
    assert table.count("(3 seeds)") == 1 and len(rows) == 2  # one row in each table, not three
    for bad, message in (
        ("[]", "non-empty list"),
        ("[1, 1]", "listed twice"),
        ("[-1]", r"seed must be an integer in \[0, 4294967295\]"),
    ):
        with pytest.raises(JobError, match=message):
            load_job(_write(tmp_path, text.replace("seeds = [0, 1, 2]", f"seeds = {bad}")))


def test_repeats_run_every_row_under_each_split_seed_and_the_decision_counts_them(tmp_path, colours):
    text = (
        JOB.format(out=tmp_path / "out", data=colours)
        .replace('source = "${data}"', 'source = "${data}"\nrepeats = 2')
        .replace('layers = ["penultimate", "blocks.2"]', 'layers = ["penultimate"]')
    )
    job = load_job(_write(tmp_path, text))
    tasks = plan(job)
    assert [t.id for t in tasks] == [
        "extract/colours/tiny",  # extracted once: splits are not in a store's key
        "classify/colours/tiny/penultimate/logreg",  # the first repeat keeps its name (and its cache)
        "classify/colours/tiny/penultimate/logreg/split1",
        "classify/colours/tiny/penultimate/knn",
        "classify/colours/tiny/penultimate/knn/split1",
        "finetune/colours/lpft",
        "finetune/colours/lpft/split1",
    ]
    assert tasks[-1].depends == ("classify/colours/tiny/penultimate/logreg/split1",)  # its own split's probe
    assert [t.plan.split_seed for t in tasks[1:]] == [0, 1, 0, 1, 0, 1]
    summary = run(job, progress=False)
    assert [t.status for t in summary.tasks] == ["done"] * 7
    from featx.jobs.report import collect, format_table

    rows = collect(tmp_path / "out")
    assert {r["split"]["plan"]["split_seed"] for r in rows} == {0, 1}
    table = format_table(rows)
    assert table.count("dataset: colours") == 1  # two split seeds, one dataset
    assert "splits (2)" in table and "Nadeau & Bengio" in table
    for bad in ("0", "1.5", "101"):
        with pytest.raises(JobError, match="repeats is the number of split seeds"):
            load_job(_write(tmp_path, text.replace("repeats = 2", f"repeats = {bad}")))


def test_the_report_states_a_learning_rate_chosen_on_val(tmp_path, colours):
    text = JOB.format(out=tmp_path / "out", data=colours).replace('phases = "head:1:1e-2"', 'phases = "head:1:auto"')
    run(load_job(_write(tmp_path, text)), only=["lpft"], progress=False)
    from featx.jobs.report import collect, write_report

    (row,) = [r for r in collect(tmp_path / "out") if r["kind"] == "finetune"]
    assert "base learning rate chosen on val by val_loss after phase 1's first epoch (0.001 → " in row["how"]
    write_report(tmp_path / "out")
    assert "base learning rate chosen on val" in (tmp_path / "out" / "report.md").read_text()
