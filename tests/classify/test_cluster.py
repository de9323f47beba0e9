"""Classifier sweeps on a Dask cluster: a LocalCluster run equals the local one; bad addresses fail clearly."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_store

from featx.classify import ClassifierConfig, train
from featx.classify.cluster import scheduler
from featx.cli import main

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each: the folds really leave this process, pickled."""
    environ = dict(os.environ)
    try:
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        ) as local:
            yield local.scheduler_address
    finally:
        # Starting workers sets OMP_NUM_THREADS=1 (and MKL_…) in this process's environment; later tests'
        # subprocesses would then run torch on one thread and round differently from in-process runs.
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture
def blobs(tmp_path):
    # Overlapping classes and a val split of 45 images, so the grid's values score differently and the choice
    # means something.
    return synthetic_store(tmp_path / "blobs.h5", per_class=60, dims=24, spread=5.0, splits=(0.5, 0.25))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("classifier", ["logreg", "svm"])  # warm-started along the grid, and one task per value
def test_local_cluster_sweep_equals_the_local_one(blobs, cluster, classifier):
    config = ClassifierConfig(classifier=classifier, grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0))
    local_model, local = train(blobs, config, n_jobs=1)
    with distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
        remote_model, remote = train(blobs, config, scheduler=cluster)
    assert stream.data, "no task ran on the cluster"
    assert len({p["mean"] for p in local["search"]["curve"]}) > 1  # the grid matters (svm stops climbing C early)
    assert remote["search"]["best"] == local["search"]["best"]
    assert remote["search"]["curve"] == local["search"]["curve"]  # every fold's score, exactly
    assert remote["test"]["accuracy"] == local["test"]["accuracy"]
    import featx.store

    with featx.store.open(blobs) as fs:
        X = fs.features(split="test")
    np.testing.assert_array_equal(remote_model.predict(X), local_model.predict(X))
    np.testing.assert_allclose(remote_model.scores(X), local_model.scores(X), rtol=0, atol=1e-12)


def test_cli_train_with_a_scheduler(blobs, cluster, tmp_path):
    runner = CliRunner()
    args = ["train", str(blobs), "-c", "logreg", "--grid", "0.01,0.1,1"]
    local = runner.invoke(main, [*args, "--jobs", "1", "--out", str(tmp_path / "local")])
    remote = runner.invoke(main, [*args, "--scheduler", cluster, "--out", str(tmp_path / "remote")])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "remote"))
    assert a["search"]["curve"] == b["search"]["curve"] and a["test"]["accuracy"] == b["test"]["accuracy"]


@pytest.mark.slow
def test_pipeline_cells_search_on_the_cluster(colour_folder, cluster, tmp_path):
    from featx.jobs.runner import run
    from featx.jobs.schema import load_job

    job_file = tmp_path / "job.toml"
    job_file.write_text(
        textwrap.dedent(
            f"""
            [job]
            out = "{tmp_path / "out"}"
            workers = 0

            [[datasets]]
            name = "colours"
            source = "{colour_folder}"

            [[backbones]]
            name = "tiny"
            backbone = "featx:tiny_test"

            [[classifiers]]
            name = "logreg"
            classifier = "logreg"
            grid = [0.01, 0.1, 1.0]
            """
        )
    )
    job = load_job(job_file)
    assert run(job, progress=False).count("done") == 2
    cell = next((tmp_path / "out" / "cells").iterdir()) / "results.json"
    local = json.loads(cell.read_text())
    result = CliRunner().invoke(main, ["run", str(job_file), "--scheduler", cluster, "--force", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 done, 1 cached" in result.output  # the store is reused, the cell is recomputed on the cluster
    remote = json.loads(cell.read_text())
    assert remote["search"]["curve"] == local["search"]["curve"]
    assert {**remote["test"], "predict_seconds": 0} == {**local["test"], "predict_seconds": 0}  # a timing


def test_unreachable_or_malformed_scheduler_fails_clearly(blobs, tmp_path):
    address = f"tcp://127.0.0.1:{_free_port()}"
    message = rf"no Dask scheduler answered at '{address}'.*dask scheduler"
    with pytest.raises(ConnectionError, match=message), scheduler(address, timeout=1):
        pass
    with pytest.raises(ValueError, match=r"not a Dask address.*tcp://"):
        train(blobs, ClassifierConfig(classifier="logreg"), scheduler="localhost")
    result = CliRunner().invoke(main, ["train", str(blobs), "--scheduler", "localhost", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not a Dask address" in result.output
    assert not (tmp_path / "o").exists()  # nothing was trained
    with pytest.raises(ValueError, match="out-of-core"):
        train(blobs, ClassifierConfig(classifier="sgd", out_of_core=True), scheduler=address)


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'featx\[dask\]'"), scheduler("tcp://127.0.0.1:8786"):
        pass
    with scheduler(None) as client:  # no scheduler: nothing to import, nothing changes
        assert client is None
