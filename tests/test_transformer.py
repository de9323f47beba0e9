"""ConvNetFeatures: a scikit-learn transformer from image paths to features through the store cache."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, make_image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks

import featx
from featx.sklearn import ConvNetFeatures


@pytest.fixture
def labelled_paths(image_folder):
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    labels = np.array([p.split("/")[-2] for p in paths])
    return paths, labels


def _features(tmp_path, **kw):
    return ConvNetFeatures(backbone=TINY, cache_dir=tmp_path / "stores", **kw)


def test_init_only_stores_parameters_and_clone_works(tmp_path):
    t = _features(tmp_path, layer="blocks.2", pool="gem")
    assert not hasattr(t, "spec_")
    c = clone(t)
    assert c.get_params() == t.get_params()
    assert featx.ConvNetFeatures is ConvNetFeatures


@pytest.mark.parametrize(
    "check",
    [
        estimator_checks.check_no_attributes_set_in_init,
        estimator_checks.check_parameters_default_constructible,
        estimator_checks.check_get_params_invariance,
        estimator_checks.check_set_params,
    ],
)
def test_relevant_sklearn_estimator_checks(check):
    check("ConvNetFeatures", ConvNetFeatures())


def test_unfitted_transform_raises_not_fitted(labelled_paths, tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        _features(tmp_path).transform(labelled_paths[0])


def test_transform_matches_extract_and_is_cached(labelled_paths, tmp_path, monkeypatch):
    paths, _ = labelled_paths
    t = _features(tmp_path).fit(paths)
    X = t.transform(paths)
    assert X.shape == (18, 256) and X.dtype == np.float32
    # Duplicates and order follow the input.
    np.testing.assert_array_equal(t.transform([paths[3], paths[0], paths[3]]), X[[3, 0, 3]])

    def no_extraction(*args, **kwargs):
        raise AssertionError("cached images must not be extracted again")

    monkeypatch.setattr("featx.extract.api.extract", no_extraction)
    np.testing.assert_array_equal(t.transform(paths[:5]), X[:5])
    # A changed file is not served from the cache.
    make_image(__import__("pathlib").Path(paths[0]), seed=777)
    with pytest.raises(AssertionError, match="must not be extracted"):
        t.transform(paths[:1])


def test_pipeline_cross_val_and_grid_search(labelled_paths, tmp_path):
    paths, labels = labelled_paths
    pipe = make_pipeline(_features(tmp_path), LogisticRegression(max_iter=500))
    scores = cross_val_score(pipe, paths, labels, cv=3)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    search = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0]}, cv=3).fit(paths, labels)
    assert search.best_params_["logisticregression__C"] in (0.1, 1.0)
    assert search.predict(paths[:2]).shape == (2,)


def test_bad_inputs_have_clear_errors(labelled_paths, tmp_path):
    paths, _ = labelled_paths
    with pytest.raises(ValueError, match="not a single path"):
        _features(tmp_path).fit(paths[0])
    with pytest.raises(ValueError, match="image paths"):
        _features(tmp_path).fit([1, 2])
    with pytest.raises(ValueError, match=r"unknown pool 'mean'\. Choose one of avg"):
        _features(tmp_path, pool="mean").fit(paths)
    with pytest.raises(ValueError, match="layer"):
        _features(tmp_path, layer="blocks.9").fit(paths)
    broken = tmp_path / "broken.png"
    broken.write_text("no")
    t = _features(tmp_path).fit(paths)
    with pytest.raises(ValueError, match="could not be read"):
        t.transform([*paths[:2], str(broken)])
