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
