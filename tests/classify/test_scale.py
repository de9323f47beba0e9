"""The classical stage at scale (issue 28): the Array API path on torch tensors, and memory known up front."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_store

from featx.classify import ClassifierConfig, arrays, load_model, memory, train
from featx.classify.training import fit_in_memory
from featx.exceptions import InsufficientMemoryError

REPO = Path(__file__).resolve().parents[2]

#: The torch path runs the same lbfgs in float32 with another summation order: coefficients agree to this
#: (absolute, on coefficients of order 1), a fold's score to one image in a few hundred, the predictions exactly.
COEF_ATOL = 2e-3
SCORE_ATOL = 0.01


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch's threads spin against the other processes of a loaded machine (a tiny fit: 0.5 s on one thread,
    11 s on two at load 16); one thread keeps these tests about the path, not the scheduler."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(n=240, d=12, k=4, seed=0):
    """L2-normalised Gaussian classes that a linear model separates only partly (so C matters)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = (rng.normal(size=(k, d))[y] * 0.4 + rng.normal(size=(n, d))).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    splits = np.where(np.arange(n) < int(0.8 * n), "train", "val")
    return X, y, splits


@pytest.mark.parametrize("with_val", [True, False], ids=["val split", "cv"])
def test_torch_path_chooses_and_fits_like_numpy(with_val):
    X, y, splits = _features()
    if not with_val:
        splits = np.full(len(y), "train")
    config = ClassifierConfig(classifier="logreg", cv=3, grid=(0.01, 0.1, 1.0))
    preset = config.preset
    a = fit_in_memory(X, y, splits, preset, config, n_jobs=1, array_path="numpy")
    b = fit_in_memory(X, y, splits, preset, config, n_jobs=1, array_path="torch")
    assert (a.trained_on["array_path"], b.trained_on["array_path"]) == ("numpy", "torch")
    assert a.value == b.value
    assert [p["mean"] for p in a.search.curve] == pytest.approx([p["mean"] for p in b.search.curve], abs=SCORE_ATOL)
    clf_a, clf_b = a.pipeline[-1], b.pipeline[-1]
    for name in ("coef_", "intercept_", "classes_"):  # converted back: the model is NumPy whatever fitted it
        assert type(getattr(clf_b, name)) is np.ndarray
    assert isinstance(b.pipeline[0].mean_, np.ndarray) and b.pipeline[-1].coef_.dtype == np.float32
    np.testing.assert_allclose(clf_b.coef_, clf_a.coef_, atol=COEF_ATOL)
    np.testing.assert_array_equal(b.pipeline.predict(X), a.pipeline.predict(X))


def test_torch_path_model_saves_and_loads_as_numpy(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", n_classes=4, per_class=30, dims=12, splits=(0.5, 0.25))
    config = ClassifierConfig(classifier="logreg", value=1.0)
    model, results = train(store, config, n_jobs=1, out_dir=tmp_path / "m", array_path="torch")
    assert model.meta["trained_on"]["array_path"] == "torch"
    loaded = load_model(tmp_path / "m" / "model.skops")
    reference, _ = train(store, config, n_jobs=1, array_path="numpy")
    X = np.random.default_rng(1).normal(size=(20, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded.pipeline.predict(X), reference.pipeline.predict(X))
    assert results["test"]["accuracy"] == json.loads((tmp_path / "m" / "results.json").read_text())["test"]["accuracy"]


def test_path_choice_and_its_reasons(monkeypatch):
    from featx.classify.presets import build_pipeline, get_preset

    logreg = build_pipeline(get_preset("logreg"), 1.0, ["standard"])
    svm = build_pipeline(get_preset("svm"), 1.0, ["l2"])
    monkeypatch.delenv(arrays.ENV, raising=False)
    monkeypatch.setattr(arrays, "cuda_free_bytes", lambda: None)
    assert arrays.choose_path(logreg).name == "numpy"  # no GPU: the host path
    assert arrays.choose_path(logreg, "torch").name == "torch"
    with pytest.raises(ValueError, match=r"LinearSVC \(clf\) has no Array API support"):
        arrays.choose_path(svm, "torch")
    with pytest.raises(ValueError, match="no CUDA device"):
        arrays.choose_path(logreg, "cuda")
    with pytest.raises(ValueError, match="array path 'gpu'"):
        arrays.choose_path(logreg, "gpu")
    monkeypatch.setenv(arrays.ENV, "torch")
    assert arrays.choose_path(logreg).name == "torch"
    monkeypatch.delenv(arrays.ENV)
    monkeypatch.setattr(arrays, "cuda_free_bytes", lambda: 8 * 2**30)  # a GPU with 8 GiB free
    assert arrays.choose_path(logreg, need_bytes=2**30).name == "cuda"
    too_big = arrays.choose_path(logreg, need_bytes=20 * 2**30)
    assert too_big.name == "numpy" and "20.0 GiB" in too_big.reason and "8.0 GiB free" in too_big.reason
    assert "LinearSVC" in arrays.choose_path(svm).reason


def test_contiguous_folds_are_views():
    X = np.arange(20.0).reshape(10, 2)
    assert np.shares_memory(arrays.take(X, np.arange(2, 7)), X)
    assert not np.shares_memory(arrays.take(X, np.array([1, 3])), X)
    T = torch.from_numpy(X)
    assert arrays.take(T, np.arange(0, 8)).data_ptr() == T.data_ptr()
    assert arrays.take(T, np.array([4, 1])).tolist() == [[8.0, 9.0], [2.0, 3.0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_chooses_and_fits_like_numpy():
    X, y, splits = _features(n=2000, d=128, k=10)
    config = ClassifierConfig(classifier="logreg")
    preset = config.preset
    a = fit_in_memory(X, y, splits, preset, config, n_jobs=1, array_path="numpy")
    b = fit_in_memory(X, y, splits, preset, config, array_path="auto")
    assert b.trained_on["array_path"] == "cuda"
    assert a.value == b.value
    assert type(b.pipeline[-1].coef_) is np.ndarray
    np.testing.assert_allclose(b.pipeline[-1].coef_, a.pipeline[-1].coef_, atol=COEF_ATOL)
    assert (b.pipeline.predict(X) == a.pipeline.predict(X)).mean() > 0.995


# ------------------------------------------------------------------------------------------------- memory
def test_a_fit_too_big_is_refused_before_the_features_are_read(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path / "s.h5", n_classes=3, per_class=20, dims=8)
    monkeypatch.setattr(memory, "available_bytes", lambda: 100)  # 100 bytes left

    def never(*args, **kwargs):
        raise AssertionError("the features were read before the memory check")

    monkeypatch.setattr("featx.classify.training.labelled_rows", never)
    with pytest.raises(InsufficientMemoryError) as caught:
        train(store, ClassifierConfig(classifier="svm", value=1.0), n_jobs=1)
    message = str(caught.value)
    for part in ("svm on 36 × 8, 3 classes", "exceeds the 0.0 GiB", "out-of-core sgd", "GPU path", "pca:256"):
        assert part in message


def test_imagenet_scale_svm_is_refused_on_24_gib_and_logreg_estimated():
    n, d, k, available = 1_000_000, 1280, 1000, 24 * 2**30
    with pytest.raises(InsufficientMemoryError, match=r"svm on 1,000,000 × 1,280, 1,000 classes: \d+\.\d GiB"):
        memory.check_fits(memory.estimate("svm", n, d, k), available)
    assert memory.estimate("svm", n, d, k).peak > available
    logreg = memory.estimate("logreg", n, d, k)
    assert logreg.held == n * d * 4 and logreg.peak > logreg.held


def test_a_parallel_search_too_big_runs_on_fewer_workers(monkeypatch, caplog):
    X, y, splits = _features(n=200, d=16, k=4)
    config = ClassifierConfig(classifier="logreg", grid=(1.0,))
    est = memory.estimate("logreg", *X.shape, 4, n_fit=160, workers=2)
    # Room for one worker's fit, not for two.
    monkeypatch.setattr(memory, "available_bytes", lambda: est.work + est.work // 2 + 1)
    monkeypatch.setattr("joblib.effective_n_jobs", lambda n_jobs: 2)
    with caplog.at_level("WARNING"):
        fit_in_memory(X, y, splits, config.preset, config, n_jobs=2, array_path="numpy")
    assert "searching on 1 workers, not 2" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "n", "d", "k"), [("logreg", 12_000, 1280, 100), ("svm", 8000, 1280, 10)])
def test_estimate_within_25_percent_of_the_measured_peak(preset, n, d, k):
    """The estimate of the working set against peak RSS (VmHWM, reset after the features exist) in a fresh
    process, at sizes outside the calibration's and large enough for the working set to dwarf the allocator's
    noise: one value searched on a val split, then the refit."""
    script = str(REPO / "benchmarks" / "bench_scale.py")
    out = subprocess.run(
        [sys.executable, script, "measure", preset, str(n), str(d), str(k), "--search"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=300,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    est = memory.estimate(preset, n, d, k, n_fit=measured["n_fit"])
    assert est.work == pytest.approx(measured["work_bytes"], rel=0.25)
