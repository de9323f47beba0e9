"""Reliability of what featx keeps between commands: the report's Markdown, stores, run folders, cells, and the
errors of the environment (issue 27, part B). Each test is a hostile or careless input that once broke."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, TINY_ROW, pipeline_toml, synthetic_store

from featx.classify import ClassifierConfig
from featx.classify.training import train
from featx.jobs.markdown import md_cell, md_code, md_text
from featx.jobs.report import write_report

HOSTILE = "x<img src=x onerror=alert(6)>"


# -------------------------------------------------------------------------------------- report.md escaping
def _render(md: str) -> str | None:
    """report.md as HTML through markdown-it (GitHub's flavour: tables), or None when it is not installed."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    return MarkdownIt("commonmark").enable("table").render(md)


@pytest.mark.parametrize(
    "value", [HOSTILE, "a`b``c", "`edge`", "a|b", "**bold** _it_ [l](javascript:x) ![i](y)", "two\nlines", "&amp; #"]
)
def test_markdown_helpers_render_the_string_itself(value):
    """Each helper's output renders as the text itself: no tag, no link, no emphasis, no broken span."""
    flat = value.replace("\n", " ")
    assert "\n" not in md_text(value) and "\n" not in md_code(value)
    html = _render(f"- {md_text(value)}\n- {md_code(value)}\n\n| a |\n| --- |\n| {md_cell(value)} |\n")
    if html is None:
        pytest.skip("markdown-it-py not installed")
    import html as htmllib

    assert "<img" not in html and "<a " not in html and "<em>" not in html and "<strong>" not in html
    items = re.findall(r"<li>(.*?)</li>", html)
    assert htmllib.unescape(items[0]) == flat
    assert htmllib.unescape(items[1]) == f"<code>{htmllib.escape(flat.strip(), quote=False)}</code>" or (
        htmllib.unescape(re.sub(r"</?code>", "", items[1])).strip() == flat.strip()
    )
    assert htmllib.unescape(re.search(r"<td>(.*?)</td>", html).group(1)) == flat


def test_report_md_escapes_hostile_store_folder_and_method_names(tmp_path):
    """A store named like an HTML tag, an output folder with a backtick and a method with ``|`` stay text."""
    root = tmp_path / "run`s"
    store = synthetic_store(tmp_path / f"{HOSTILE}.h5", per_class=10)
    out = root / "a`b<img src=x onerror=alert(1)>"
    train(store, ClassifierConfig(classifier="logreg"), n_jobs=1, out_dir=out)
    results = json.loads((out / "results.json").read_text())
    results["method"] = "svm | *evil* <script>alert(2)</script>"
    (out / "results.json").write_text(json.dumps(results))
    md = write_report(root)["markdown"].read_text()

    assert re.search(r"^## .*x\\<img src=x onerror=alert\(6\)\\>", md, re.M)  # the heading: escaped
    assert "``a`b<img src=x onerror=alert(1)>/results.json``" in md  # a fence the backtick inside cannot close
    assert not re.search(r"(?<![\\`])<(img|script)", md.replace("``a`b<img", ""))  # any other < is escaped
    tables = re.findall(r"(?:^\|.*\n)+", md, re.M)
    assert len(tables) == 2 and all("| svm \\| \\*evil\\*" in t for t in tables)
    for table in tables:  # every row has its header's cells: the | inside the name is escaped, not a border
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}) == 1
    html = _render(md)
    if html is None:
        return
    assert "<script" not in html and "<em>evil" not in html
    images = re.findall(r"<img [^>]*>", html)  # the plots' only: src, alt and nothing else
    assert images and all(re.fullmatch(r'<img src="plots/[^"]+" alt="[^"]*" />', tag) for tag in images)
    assert html.count("<tr>") == 4  # two tables, a header and the one row each
    assert re.search(r"<td>svm \| \*evil\* &lt;script&gt;", html)
    assert "a`b&lt;img src=x onerror=alert(1)&gt;/results.json</code>" in html  # the whole path in one span


# ------------------------------------------------------------------------------------ tampered stores
def _spec_layer_renamed(f):
    spec = json.loads(f.attrs["spec"])
    spec["layers"] = ["renamed"]
    f.attrs["spec"] = json.dumps(spec)


def _labels_shortened(f):
    labels = f["labels"][:-3]
    del f["labels"]
    f["labels"] = labels


def _split_code_7(f):
    split = f["split"][:]
    split[4] = 7
    f["split"][...] = split


def _label_beyond_classes(f):
    labels = f["labels"][:]
    labels[2] = 9
    f["labels"][...] = labels


TAMPERINGS = {
    "spec layer renamed": (_spec_layer_renamed, "no features for layer 'renamed'"),
    "key deleted": (lambda f: f.attrs.__delitem__("key"), "'key' attribute is missing"),
    "split code 7": (_split_code_7, "split column holds code 7"),
    "labels shorter": (_labels_shortened, "it has 30 ids but labels 27 rows"),
    "features removed": (lambda f: f["features"].__delitem__("penultimate"), "no features for layer 'penultimate'"),
    "label beyond classes": (_label_beyond_classes, "row 2 has label 9, but there are 3 class names"),
    "spec not JSON": (lambda f: f.attrs.__setitem__("spec", "{not json"), "'spec' attribute is not valid JSON"),
    "spec lacks a field": (
        lambda f: f.attrs.__setitem__("spec", json.dumps({"backbone": "x"})),
        "'spec' attribute does not describe an extraction",
    ),
    "class names removed": (lambda f: f.__delitem__("class_names"), "lacks the dataset class_names"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_tampered_store_is_one_clear_error_in_info_and_train(tmp_path, case):
    import h5py
    from click.testing import CliRunner

    from featx.cli import main
    from featx.exceptions import StoreError
    from featx.store import open_store

    tamper, message = TAMPERINGS[case]
    store = synthetic_store(tmp_path / "blobs.h5", per_class=10)
    with h5py.File(store, "r+") as f:
        tamper(f)
    with pytest.raises(StoreError, match=re.escape(message)) as caught:
        open_store(store)
    assert str(store) in str(caught.value) and "run the extraction" in str(caught.value)
    for command in (["info", str(store)], ["train", str(store), "-c", "logreg", "--out", str(tmp_path / "m")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output


def test_an_untouched_store_passes_the_check(tmp_path):
    from featx.store import open_store

    with open_store(synthetic_store(tmp_path / "blobs.h5", per_class=10)) as store:
        assert len(store) == 30 and store.class_names == ["class0", "class1", "class2"]


# --------------------------------------------------------------------------------- damaged run folders
def _pipeline(path: Path, out, data) -> Path:
    knn = {"name": "knn", "classifier": "knn"}
    datasets = [{"name": "colours", "source": data}]
    return pipeline_toml(path, name="state", out=out, datasets=datasets, backbones=[TINY_ROW], classifiers=[knn])


CELL = "classify/colours/tiny/penultimate/knn"


@pytest.fixture
def pipeline(tmp_path, colour_folder) -> Path:
    return _pipeline(tmp_path / "job.toml", tmp_path / "out", colour_folder)


def _run(pipeline: Path, **kw):
    from featx.jobs import load_job, run

    summary = run(load_job(pipeline), progress=False, **kw)
    return {t.id: (t.status, t.message) for t in summary.tasks}


def _cell(pipeline: Path) -> Path:
    return pipeline.parent / "out" / "cells" / "colours__tiny__penultimate__knn"


@pytest.mark.parametrize(
    ("damaged", "damage", "named"),
    [
        ("cell.json", lambda p: p.write_text(p.read_text()[:20]), "cell.json is damaged"),
        ("cell.json", lambda p: p.write_text("[1, 2]"), "cell.json is damaged"),
        ("results.json", lambda p: p.write_text(p.read_text()[:100]), "its results do not read"),
        ("results.json", lambda p: p.write_text('{"schema": 1}'), "its results do not read"),
    ],
)
def test_a_damaged_cell_is_named_and_done_again(pipeline, damaged, damage, named):
    from featx.jobs.report import collect
    from featx.results import read_results

    assert _run(pipeline)[CELL] == ("done", "")
    damage(_cell(pipeline) / damaged)
    planned = _run(pipeline, dry_run=True)[CELL]
    assert planned[0] == "planned" and named in planned[1]
    status, message = _run(pipeline)[CELL]
    assert status == "done" and message.startswith("redone: ") and named in message
    read_results(_cell(pipeline) / "results.json")
    assert len(collect(pipeline.parent / "out")) == 1  # the row is in the report again
    assert _run(pipeline)[CELL] == ("cached", "")


# ------------------------------------------------------------------------------------------ cell locks
_HOLD = """
import sys
from pathlib import Path
from featx._runtime.lock import FileLock
FileLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.contextmanager
def _held_by_another_process(lock: Path):
    """Hold ``lock`` (a featx lock file) from a child process for the duration of the block."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_cell_another_run_holds_is_skipped_with_the_holder_then_runs(pipeline):
    """Two `featx run` of one pipeline: the second leaves the cell the first is running (no traceback)."""
    with _held_by_another_process(_cell(pipeline) / "cell.lock") as pid:
        tasks = _run(pipeline)
    status, message = tasks[CELL]
    assert status == "skipped" and f"another featx run (pid {pid} on " in message
    assert "Traceback" not in (pipeline.parent / "out" / "run.log").read_text()
    assert not (_cell(pipeline) / "results.json").exists()
    assert _run(pipeline)[CELL] == ("done", "")  # the lock died with its holder


def test_a_store_another_run_is_extracting_is_skipped_with_the_holder(pipeline):
    from featx.store.format import partial_path

    store = _run_store(pipeline)
    with _held_by_another_process(partial_path(store) / "lock") as pid:
        tasks = _run(pipeline)
    assert tasks["extract/colours/tiny"][0] == "skipped" and f"pid {pid} on" in tasks["extract/colours/tiny"][1]
    assert tasks[CELL] == ("skipped", "depends on extract/colours/tiny, which did not finish")
    assert "Traceback" not in (pipeline.parent / "out" / "run.log").read_text()


def _run_store(pipeline: Path) -> Path:
    from featx.jobs import load_job, run

    summary = run(load_job(pipeline), progress=False, dry_run=True)
    return Path(summary.tasks[0].store)


def test_an_unwritable_out_names_the_pipeline_line_and_the_fix(tmp_path, colour_folder):
    from featx.jobs import JobError

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (Linux)")
    path = _pipeline(tmp_path / "job.toml", "/proc/featx", colour_folder)
    with pytest.raises(JobError, match=r"job.toml:3: .*out '/proc/featx' cannot be created or written .*set out in"):
        _run(path)


@pytest.mark.parametrize("command", ["train", "extract", "finetune"])
def test_an_unwritable_out_fails_before_the_work_naming_the_folder(tmp_path, command):
    from click.testing import CliRunner

    from featx.cli import main

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (Linux)")
    store = synthetic_store(tmp_path / "blobs.h5", per_class=10)
    args = {
        "train": ["train", str(store), "-c", "knn", "--out", "/proc/featx"],
        "extract": ["extract", str(tmp_path), "--backbone", TINY, "--out", "/proc/featx/x.h5"],
        "finetune": ["finetune", str(tmp_path), "--backbone", TINY, "--phases", "head:1:1e-2", "--out", "/proc/featx"],
    }[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "'/proc/featx' cannot be created or written (No such file or directory): choose a folder" in result.output


# -------------------------------------------------------------------------------------------- fine-tunes
def _ft_config():
    from featx.finetune import FinetuneConfig, parse_phases

    return FinetuneConfig(phases=tuple(parse_phases("head:1:1e-2,all:1:1e-3")), batch_size=8)


class _Evil:
    """Pickles as a call of ``os.system``: what a crafted checkpoint would run if it were unpickled freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["pickled code", "truncated", "not a checkpoint", "a list"])
def test_a_damaged_checkpoint_is_named_and_the_fine_tune_starts_afresh(tmp_path, caplog, damage):
    import torch

    from featx._runtime.dist import World
    from featx.exceptions import DamagedFileError
    from featx.finetune.state import read_checkpoint
    from featx.finetune.trainer import restore_or_start

    checkpoint = tmp_path / "checkpoint.pt"
    if damage == "pickled code":
        torch.save({"run_hash": _Evil(tmp_path / "ran")}, checkpoint)
    elif damage == "truncated":
        torch.save({"model": torch.zeros(4096)}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    else:
        torch.save([1, 2], checkpoint)
    with pytest.raises(DamagedFileError, match=re.escape(f"{checkpoint} is not ")):
        read_checkpoint(checkpoint)
    for overwrite in (False, True):
        state = restore_or_start(World(), tmp_path, "this-run", overwrite=overwrite)
        assert (state.run_hash, state.phase, state.curves, state.model) == ("this-run", 0, [], None)
    assert not (tmp_path / "ran").exists()  # the crafted pickle never ran
    assert f"{checkpoint} is not " in caplog.text and "starts afresh" in caplog.text


@pytest.mark.slow
def test_a_damaged_checkpoint_is_replaced_under_overwrite_from_the_cli(colour_folder, tmp_path):
    from click.testing import CliRunner

    from featx.cli import main

    out = tmp_path / "ft"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    args = ["finetune", str(colour_folder), "--backbone", TINY, "--phases", "head:1:1e-2", "--batch-size", "8"]
    result = CliRunner().invoke(main, [*args, "--workers", "0", "--no-progress", "--overwrite", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "is not valid JSON"), ('{"backbone": "featx:tiny_test"}', "lacks class_names, preprocessing, head")],
)
def test_a_broken_finetune_json_is_named(tmp_path, text, message):
    from featx.exceptions import DamagedFileError
    from featx.finetune import load_finetuned

    (tmp_path / "finetune.json").write_text(text)
    with pytest.raises(DamagedFileError, match=re.escape(message)) as caught:
        load_finetuned(tmp_path)
    assert str(tmp_path / "finetune.json") in str(caught.value) and "re-run the `featx finetune`" in str(caught.value)


@pytest.mark.slow
def test_a_resumed_fine_tune_records_the_compute_of_every_process(colour_folder, tmp_path, monkeypatch):
    """The seconds of a run interrupted after its first checkpoint and resumed count both processes."""
    import time

    import torch

    from featx.finetune import epochs, finetune

    save, writes = epochs.save_checkpoint, []

    def save_then_stop(path, state):  # the first process spends 1 s more, then dies after its first checkpoint
        writes.append(path)
        time.sleep(1.0)
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(epochs, "save_checkpoint", save_then_stop)
    out = tmp_path / "ft"
    with pytest.raises(KeyboardInterrupt):
        finetune(colour_folder, TINY, _ft_config(), out, workers=0, progress=False)
    monkeypatch.undo()
    before = torch.load(out / "checkpoint.pt", weights_only=True)["seconds"]
    assert before >= 1.0
    start = time.perf_counter()
    results = finetune(colour_folder, TINY, _ft_config(), out, workers=0, progress=False)
    resumed_wall = time.perf_counter() - start
    # This process's own seconds are at most its wall time; the first process's come on top of them.
    assert before < results["seconds"] <= before + resumed_wall
    assert results["seconds"] > resumed_wall
    assert torch.load(out / "checkpoint.pt", weights_only=True)["seconds"] > before


# ------------------------------------------------------------------------------- errors of the environment
_OPEN = """
import sys, h5py
f = h5py.File(sys.argv[1], "r")
print("held", flush=True)
sys.stdin.read()
"""


def test_relabelling_a_store_another_process_has_open_names_the_store_and_the_holder(tmp_path):
    import numpy as np

    from featx.data import Manifest
    from featx.exceptions import StoreLockedError
    from featx.store import open_store
    from featx.store.writer import update_labels

    store = synthetic_store(tmp_path / "blobs.h5", per_class=10)
    with open_store(store) as s:
        ids, paths, labels = s.ids(), s.paths(), s.labels()
    relabelled = Manifest(ids, paths, (labels + 1) % 3, ["train"] * 30, ["class0", "class1", "class2"], "relabelled")
    proc = subprocess.Popen(
        [sys.executable, "-c", _OPEN, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"{re.escape(str(store))} is open by pid {proc.pid} \("):
            update_labels(store, relabelled)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert update_labels(store, relabelled)  # once it is closed, the update goes through
    with open_store(store) as s:
        assert np.array_equal(s.labels(), (labels + 1) % 3)


def test_a_torchvision_dataset_offline_says_it_needs_the_network_or_a_copy(monkeypatch):
    import urllib.error

    import torchvision.datasets

    from featx.data.sources import from_torchvision

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, root, train=True, download=False):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(RuntimeError) as caught:
        from_torchvision("CIFAR10")
    message = str(caught.value)
    assert "needs the network" in message and "cifar-10-python.tar.gz" in message
    assert "torchvision/CIFAR10" in message and "Temporary failure in name resolution" in message


def test_the_public_results_error_is_the_one_read_results_raises(tmp_path):
    """``except featx.ResultsError`` catches a damaged results file (there was once a second, unrelated class)."""
    import featx
    from featx.results import read_results

    (tmp_path / "results.json").write_text('{"schema": "featx.results/1", ')
    with pytest.raises(featx.ResultsError, match="is not valid JSON"):
        read_results(tmp_path / "results.json")
