"""The classical search: converged and says so, widened at an edge, refined, stopped early; per-image predictions."""

from __future__ import annotations

import importlib
import json
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_store

import featx.store
from featx.classify import PRESETS, ClassifierConfig, build_pipeline, load_model, train
from featx.classify.search import cv_folds, search
from featx.cli import main

# featx.classify re-exports the functions, which shadow these module names as attributes.
search_mod = importlib.import_module("featx.classify.search")
training_mod = importlib.import_module("featx.classify.training")


@pytest.fixture
def blobs(tmp_path):
    return synthetic_store(tmp_path / "blobs.h5")


def _train(store, **config):
    return train(store, ClassifierConfig(**config), n_jobs=1)


# ----------------------------------------------------------------------------------------- convergence
def test_a_fit_that_does_not_converge_is_flagged_in_the_results(tmp_path, monkeypatch):
    hard = synthetic_store(tmp_path / "hard.h5", spread=4.0)
    monkeypatch.setattr(training_mod, "_REFIT_RETRIES", 0)  # the refit keeps max_iter=1 too
    _, results = _train(hard, classifier="svm", params=(("max_iter", 1),))
    points = results["search"]["curve"] + results["search"]["refined"]
    assert all(p["converged"] is False and p["n_iter"] >= 1 for p in points)
    assert results["search"]["converged"] is False
    assert results["train"]["converged"] is False and results["train"]["max_iter"] == 1


def test_the_refit_raises_max_iter_until_it_converges(tmp_path):
    hard = synthetic_store(tmp_path / "hard.h5", spread=4.0)
    _, results = _train(hard, classifier="logreg", value=10.0, params=(("max_iter", 2),))
    assert results["train"]["converged"] is True
    assert results["train"]["max_iter"] > 2 and results["train"]["n_iter"] < results["train"]["max_iter"]


def test_converged_fits_say_so(blobs):
    _, results = _train(blobs, classifier="logreg")
    assert results["search"]["converged"] is True and results["train"]["converged"] is True
    assert all(p["converged"] for p in results["search"]["curve"])
    _, ridge = _train(blobs, classifier="ridge")  # not iterative: nothing to report, and nothing claimed
    assert "converged" not in ridge["search"]["curve"][0] and ridge["train"]["converged"] is None


def test_an_unlimited_max_iter_counts_as_converged_and_is_never_multiplied(blobs):
    # SVC's max_iter=-1 means "no limit": treating it as a cap flagged every fit and the refit asked for -10.
    _, results = _train(blobs, classifier="sklearn.svm.SVC")
    assert results["search"]["converged"] is True
    assert results["train"]["converged"] is True and results["train"]["max_iter"] == -1


# ---------------------------------------------------------------------------- a synthetic score curve
def _scripted(monkeypatch, score_of):
    """Replace each fold's fit by ``score_of(value)``; returns the values fitted, in order."""
    fitted, lock = [], threading.Lock()

    def fake_fit_point(est, param, value, warm, fold, scoring):
        with lock:
            fitted.append(value)
        return float(score_of(value)), True, 1, est

    monkeypatch.setattr(search_mod, "_fit_point", fake_fit_point)
    return fitted


def _search(grid=PRESETS["svm"].grid, preset=PRESETS["svm"]):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)).astype(np.float32), np.repeat([0, 1, 2], 20)
    folds, scheme = cv_folds(y, np.array(["train"] * 60), 5, 0)
    return search(build_pipeline(preset, 1.0, ["standard"]), preset, grid, X, y, folds, scheme, n_jobs=1)


def _distinct(values):
    return sorted({round(float(np.log10(v)), 9) for v in values})


def test_an_edge_optimum_widens_the_grid_by_two_decades(monkeypatch):
    _scripted(monkeypatch, lambda c: -abs(np.log10(c) + 5.3))  # peak at C=10**-5.3, below the grid (1e-4)
    result = _search()
    assert _distinct(result.widened) == [-6.0, -5.0]
    assert result.best == pytest.approx(10 ** (-5 - 1 / 3))  # refined around the widened best
    assert not result.at_edge and len(result.refined) >= 4
    assert all(abs(np.log10(p["value"]) + 5) <= 1 for p in result.refined)


def test_an_optimum_still_at_the_edge_after_widening_is_accepted_and_marked(monkeypatch):
    _scripted(monkeypatch, lambda c: np.log10(c))  # always rising: the best is at the top, even widened
    result = _search(grid=(1e-2, 1e-1, 1.0))
    assert _distinct(result.widened) == [1.0, 2.0]
    assert result.at_edge and result.best == 100.0
    assert all(p["value"] < 100.0 for p in result.refined) and len(result.refined) == 4  # refined inwards


def test_a_plateau_reaching_inside_the_grid_is_no_edge_optimum(monkeypatch):
    _scripted(monkeypatch, lambda c: 1.0 if c <= 1e-2 else 0.5)
    result = _search()
    assert result.widened == [] and not result.at_edge and result.best == 1e-4  # ties: the smaller value


@pytest.mark.parametrize("peak", [-4.0, -3.4, -2.0, -0.5, 0.0, 1.7, 3.0, 4.0])
def test_early_stop_never_skips_the_best_point_of_a_unimodal_curve(monkeypatch, peak):
    fitted = _scripted(monkeypatch, lambda c: -((np.log10(c) - peak) ** 2))
    result = _search()
    grid = PRESETS["svm"].grid
    full_best = max(grid, key=lambda c: -((np.log10(c) - peak) ** 2))
    coarse = {p["value"]: p["mean"] for p in result.curve}
    assert full_best in coarse and max(coarse, key=coarse.get) == full_best
    if result.skipped:  # stopped at the first clear fall past the peak: nothing above was paid for
        scores = [-((np.log10(c) - peak) ** 2) for c in grid]
        last_best = max(i for i, v in enumerate(scores) if v == max(scores))  # a tie is no fall
        assert result.stopped_early == grid[last_best + 1]  # these scores fall by far more than a standard error
        assert not set(result.skipped) & set(fitted)
        assert result.skipped == [c for c in grid if c > result.stopped_early]
    assert abs(np.log10(result.best) - peak) <= abs(np.log10(full_best) - peak) + 1e-9


def test_early_stop_saves_the_large_c_fits(monkeypatch):
    fitted = _scripted(monkeypatch, lambda c: -abs(np.log10(c) + 2))
    result = _search()
    assert result.stopped_early == 0.1 and result.skipped == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert max(fitted) <= 0.1


@pytest.mark.parametrize(
    ("scores", "stop"),
    [
        # 60 validated images: one standard error at 0.80 is 0.052. A fall within it waits for a second fall.
        ({1e-4: 0.70, 1e-3: 0.75, 1e-2: 0.80, 0.1: 0.79, 1.0: 0.78, 10.0: 0.9}, 1.0),
        # a fall of 0.2 is clear: climbing stops at once
        ({1e-4: 0.70, 1e-3: 0.75, 1e-2: 0.80, 0.1: 0.60, 1.0: 0.95}, 0.1),
        # a noisy dip that comes back: not a stop
        ({1e-4: 0.70, 1e-3: 0.75, 1e-2: 0.80, 0.1: 0.78, 1.0: 0.85, 10.0: 0.84, 100.0: 0.83}, 100.0),
    ],
)
def test_climbing_stops_at_a_clear_fall_or_at_a_second_one(monkeypatch, scores, stop):
    _scripted(monkeypatch, lambda c: scores.get(min(scores, key=lambda k: abs(np.log10(k) - np.log10(c)))))
    result = _search(grid=(*sorted(scores), 1e3, 1e4))
    assert result.stopped_early == stop


def test_a_search_without_refinement_scores_exactly_the_grid(monkeypatch):
    _scripted(monkeypatch, lambda c: -abs(np.log10(c) + 9))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)).astype(np.float32), np.repeat([0, 1, 2], 10)
    folds, scheme = cv_folds(y, np.array(["train"] * 30), 3, 0)
    preset = PRESETS["svm"]
    grid = (1e-2, 1.0, 1e-1)
    result = search(build_pipeline(preset, 1.0, []), preset, grid, X, y, folds, scheme, n_jobs=1, refine=False)
    assert [p["value"] for p in result.curve] == [1e-2, 1e-1, 1.0] and result.refined == []
    assert result.best == 1e-2 and result.at_edge


# ----------------------------------------------------------------------------------- per-image predictions
@pytest.mark.parametrize("name", ["svm", "logreg", "knn"])
def test_per_image_predictions_match_predict_on_the_test_rows(blobs, tmp_path, name):
    model, results = train(blobs, ClassifierConfig(classifier=name), n_jobs=1, out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())["test"]["predictions"]
    assert on_disk == results["test"]["predictions"]
    with featx.store.open(blobs) as fs:
        X, y, ids = fs.features(split="test"), fs.labels("test"), fs.ids("test")
    predicted = model.predict(X)
    assert on_disk["ids"] == ids and on_disk["true"] == y.tolist() and on_disk["predicted"] == predicted.tolist()
    top = np.array(on_disk["top_classes"])
    assert top.shape == (len(y), 3) and np.array_equal(top[:, 0], predicted)
    scores = model.scores(X)
    np.testing.assert_allclose(on_disk["top_scores"], np.take_along_axis(scores, top, axis=1), rtol=1e-5, atol=1e-6)


def test_featx_evaluate_writes_the_predictions(blobs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(blobs), "-c", "logreg", "--jobs", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "eval.json"
    args = ["evaluate", str(blobs), "--model", str(tmp_path / "m" / "model.skops"), "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    predictions = json.loads(out.read_text())["predictions"]
    model = load_model(tmp_path / "m" / "model.skops")
    with featx.store.open(blobs) as fs:
        assert predictions["predicted"] == model.predict(fs.features(split="test")).tolist()
        assert predictions["ids"] == fs.ids("test")


# ------------------------------------------------------------------------------------------ learning curves
def test_few_shot_draws_are_nested_per_draw():
    y = np.repeat([0, 1, 2], 30)
    rows = training_mod.shot_rows(y, [1, 2, 5, 10, "all"], draws=4, seed=0)
    for small, large in [(1, 2), (2, 5), (5, 10)]:
        for d in range(4):
            assert set(rows[small][d]) < set(rows[large][d])
            assert np.array_equal(np.bincount(y[rows[large][d]]), [large] * 3)
    assert len({tuple(r) for r in rows[5]}) == 4  # the draws differ
    again = training_mod.shot_rows(y, [5], draws=4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again[5], rows[5], strict=True))  # seeded
    assert np.array_equal(rows["all"][0], np.arange(len(y)))


def test_few_shot_chooses_the_value_inside_each_k_shot_set(tmp_path):
    hard = synthetic_store(tmp_path / "hard.h5", spread=3.0)
    _, results = train(hard, ClassifierConfig(classifier="logreg"), n_jobs=1, shots=[1, 4, "all"], draws=3)
    curve = {p["shots"]: p for p in results["few_shot"]}
    assert curve[1]["values"] == [training_mod.ONE_SHOT_VALUE] * 3 and "fixed" in curve[1]["selection"]
    assert curve[4]["selection"] == "4-fold stratified CV" and len(curve[4]["values"]) == 3
    assert curve["all"]["values"] == [results["classifier"]["chosen"]]
    for point in curve.values():
        lo, hi = point["ci95"]
        assert lo <= point["mean"] <= hi
    assert curve[4]["ci95"][1] - curve[4]["ci95"][0] > 0


@pytest.mark.parametrize("peak", [-4.0, -3.0, 0.0, 3.0])
def test_a_climb_on_one_val_split_scores_values_side_by_side_and_chooses_as_one_at_a_time(monkeypatch, peak):
    from joblib import parallel_config

    fitted = _scripted(monkeypatch, lambda c: -((np.log10(c) - peak) ** 2))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)).astype(np.float32), np.repeat([0, 1, 2], 20)
    folds, scheme = cv_folds(y, np.array(["train"] * 45 + ["val"] * 15), 5, 0)
    assert scheme == "validation split" and len(folds) == 1
    preset = PRESETS["svm"]

    def climb(n_jobs):
        fitted.clear()
        with parallel_config(backend="threading"):  # the scripted fit lives in this process
            result = search(build_pipeline(preset, 1.0, ["l2"]), preset, preset.grid, X, y, folds, scheme, n_jobs)
        return result, sorted(fitted)

    one, one_fitted = climb(1)
    two, two_fitted = climb(2)
    assert (two.curve, two.refined, two.skipped, two.stopped_early, two.best) == (
        one.curve,
        one.refined,
        one.skipped,
        one.stopped_early,
        one.best,
    )
    assert len(two_fitted) - len(one_fitted) <= 1  # at most one value scored past the stop, then dropped
    if peak == -3.0:  # the stop falls on the first value of a pair: its neighbour was scored beside it
        assert len(two_fitted) == len(one_fitted) + 1 and one.skipped
