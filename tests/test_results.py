"""The results schema: files written by earlier featx still read; a file that cannot be read says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featx.results import SCHEMA, NotResultsError, ResultsError, read_results, write_results

FIXTURES = Path(__file__).parent / "fixtures" / "tiny"


@pytest.mark.parametrize("kind, folder", [("classifier", "logreg"), ("finetune", "finetune")])
def test_results_written_by_earlier_featx_still_read(kind, folder):
    path = FIXTURES / folder / "results.json"
    results = read_results(path)
    assert results == json.loads(path.read_text())  # read as written, nothing dropped or renamed
    assert results["kind"] == kind and results["schema"] == SCHEMA == "featx.results/1"
    assert results["test"]["confusion_matrix"] and results["test"]["per_class"]


def test_write_then_read_is_the_same_document(tmp_path):
    results = json.loads((FIXTURES / "logreg" / "results.json").read_text())
    results["train"]["n"] = np.int64(results["train"]["n"])  # NumPy scalars are written as numbers
    path = write_results(tmp_path / "results.json", results)
    assert read_results(path)["train"]["n"] == int(results["train"]["n"])
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]  # no temporary file left behind
    with pytest.raises(ValueError):
        write_results(tmp_path / "nan.json", {**results, "seconds": float("nan")})


@pytest.mark.parametrize(
    "text, error, message",
    [
        ('{"schema": "featx.res', ResultsError, "is not valid JSON"),
        ('{"rows": []}', NotResultsError, "not a featx results file"),
        ("[1, 2]", NotResultsError, "not a featx results file"),
        ('{"schema": "featx.results/2", "kind": "classifier"}', ResultsError, "written by a newer featx"),
        ('{"schema": "featx.results/1", "kind": "probe"}', ResultsError, "unknown results kind 'probe'"),
        ('{"schema": "featx.results/1", "kind": "finetune", "method": "m"}', ResultsError, "'curves'"),
    ],
)
def test_unreadable_results_say_what_is_wrong(tmp_path, text, error, message):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(error, match=message) as info:
        read_results(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_results_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_results(tmp_path / "nope.json")


def test_the_results_error_is_the_one_featx_exports(tmp_path):
    import featx
    import featx.exceptions
    import featx.results

    assert featx.ResultsError is featx.results.ResultsError is featx.exceptions.ResultsError
    assert featx.NotResultsError is featx.results.NotResultsError
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(featx.ResultsError):  # `except featx.ResultsError` catches what read_results raises
        read_results(path)


def test_a_cell_is_recorded_when_the_results_are_written_never_amended(tmp_path):
    from conftest import synthetic_store

    import featx.jobs.runner
    from featx.classify import ClassifierConfig, train
    from featx.results import CellInfo

    store = synthetic_store(tmp_path / "s.h5", n_classes=2, per_class=20, spread=3.0, seed=1)
    cell = CellInfo(id="classify/d/b/penultimate/logreg", dataset="d", name="logreg", backbone="b", layer=None)
    _, results = train(store, ClassifierConfig(classifier="logreg", value=1.0), out_dir=tmp_path / "o", cell=cell)
    assert results["cell"] == cell == read_results(tmp_path / "o" / "results.json")["cell"]
    assert not hasattr(featx.jobs.runner, "write_results")  # the runner passes the cell in; it amends no results


def _shape(value):
    """The keys of every nested section, and the type of every leaf (lists by their first item)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


@pytest.mark.slow  # ~7 CPU-seconds: an extraction, a fit and a one-epoch fine-tune
def test_a_classifier_and_a_fine_tune_on_the_same_images_share_the_envelope(colour_folder, tmp_path):
    from conftest import TINY

    from featx.classify import ClassifierConfig, train
    from featx.extract import extract
    from featx.finetune import FinetuneConfig, finetune, parse_phases
    from featx.results import SHARED_SECTIONS, CellInfo

    cell = CellInfo(id="t/c", dataset="colours", name="row", backbone=TINY, layer=None, seed=0)
    store = extract(colour_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    config = ClassifierConfig(classifier="logreg", value=1.0)
    _, clf = train(store, config, n_jobs=1, out_dir=tmp_path / "c", cell=cell)
    ft_config = FinetuneConfig(phases=tuple(parse_phases("head:1:1e-2")), batch_size=16)
    ft = finetune(colour_folder, TINY, ft_config, tmp_path / "f", workers=0, progress=False, cell=cell)
    for results, folder in ((clf, "c"), (ft, "f")):
        assert read_results(tmp_path / folder / "results.json") == json.loads(json.dumps(results))
        assert set(SHARED_SECTIONS) <= results.keys()
    # One split section: the same images, sizes, plan and rule, refit recorded alike.
    assert clf["split"] == ft["split"]
    # One test section: the same metrics and per-image predictions, on the same test images.
    assert _shape(clf["test"]) == _shape(ft["test"])
    assert sorted(clf["test"]["predictions"]["ids"]) == sorted(ft["test"]["predictions"]["ids"])
    # One header: the cell passed in, the same versions recorded, created_at in one format.
    assert clf["cell"] == ft["cell"] == cell and clf["versions"].keys() == ft["versions"].keys()
    assert all(r["created_at"].endswith("+00:00") and len(r["created_at"]) == 25 for r in (clf, ft))
    assert (clf["val"].keys(), _shape(clf["train"])["n"]) == (ft["val"].keys(), _shape(ft["train"])["n"])


def test_assemble_refuses_a_stage_part_that_redoes_a_shared_section_or_a_document_that_lacks_one():
    from featx.data.splits import SplitPlan
    from featx.results import TrainSummary, assemble, header, split_section

    head = header("finetune", "m")
    split = split_section(SplitPlan(), "given", {"train": "1:ab"}, {"train": 1})
    with pytest.raises(ValueError, match=r"shared sections \['split'\]"):
        assemble(head, {"split": split}, split=split, train=TrainSummary(n=1, fit_seconds=0.0), test=None)
    with pytest.raises(ValueError, match="a finetune results document needs 'backbone'"):
        assemble(head, {}, split=split, train=TrainSummary(n=1, fit_seconds=0.0), test=None)
    with pytest.raises(ValueError, match="unknown results kind 'probe'"):
        header("probe", "m")


def test_no_module_reads_a_results_file_back_to_amend_it():
    # A results file is written once, by the stage that made it (a pipeline cell passes its cell in).
    package = Path(__file__).resolve().parents[1] / "featx"
    amending = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "results.py" and "read_results(" in (text := p.read_text()) and "write_results(" in text
    ]
    assert not amending
