"""ConvNetFeatures: a scikit-learn transformer from image paths to features through the store cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import TINY, make_image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks

import featx
import featx.store
from featx.extract import extract
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


def test_transform_matches_extract_and_is_cached(labelled_paths, image_folder, tmp_path, monkeypatch):
    paths, _ = labelled_paths
    t = _features(tmp_path).fit(paths)
    X = t.transform(paths)
    assert X.shape == (18, 256) and X.dtype == np.float32
    # Bit for bit the features featx.extract.extract stores for the same images with the same spec.
    reference = extract(image_folder, TINY, out=tmp_path / "reference.h5", workers=0, progress=False)
    with featx.store.open(reference.path) as store:
        assert store.spec.to_dict() == t.spec_
        by_path = dict(zip(store.paths(), store.features(), strict=True))
    assert sorted(by_path) == paths
    np.testing.assert_array_equal(X, np.stack([by_path[p] for p in paths]))
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


def test_feature_count_is_known_after_fit_and_transform_changes_no_state(labelled_paths, tmp_path):
    # scikit-learn's conventions: fit sets the trailing-underscore attributes, transform leaves them alone.
    paths, _ = labelled_paths
    t = _features(tmp_path).fit(paths)
    assert t.n_features_out_ == 256
    names = t.get_feature_names_out()
    assert list(names[:2]) == ["penultimate_0", "penultimate_1"] and len(names) == 256
    state = dict(vars(t))
    assert t.transform(paths[:4]).shape == (4, t.n_features_out_)
    assert vars(t) == state


@pytest.fixture
def colour_paths(colour_folder):
    paths = sorted(str(p) for p in colour_folder.rglob("*.png"))
    return paths, np.array([p.split("/")[-2] for p in paths])


def test_pipeline_cross_val_and_grid_search(colour_paths, tmp_path):
    # The colour images are separable, so the pipeline must beat chance (1/3) clearly; and every number
    # cross_val_score and GridSearchCV report must equal a manual fit on the same folds' features.
    paths, labels = colour_paths
    folds = list(StratifiedKFold(3).split(paths, labels))
    X = _features(tmp_path).fit_transform(paths)

    def classifier(C: float = 1.0):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500))

    def manual_score(C: float, train: np.ndarray, test: np.ndarray) -> float:
        return classifier(C).fit(X[train], labels[train]).score(X[test], labels[test])

    pipe = make_pipeline(_features(tmp_path), StandardScaler(), LogisticRegression(max_iter=500))
    scores = cross_val_score(pipe, paths, labels, cv=StratifiedKFold(3))
    np.testing.assert_array_equal(scores, [manual_score(1.0, train, test) for train, test in folds])
    assert scores.min() >= 0.9, scores

    grid = [1e-4, 1.0]  # the tiny C underfits these features (mean fold accuracy about 0.77): the search must see it
    search = GridSearchCV(pipe, {"logisticregression__C": grid}, cv=StratifiedKFold(3)).fit(paths, labels)
    manual = [np.mean([manual_score(C, train, test) for train, test in folds]) for C in grid]
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], manual, rtol=0, atol=1e-12)
    best = grid[int(np.argmax(manual))]  # argmax keeps the first of ties, as GridSearchCV does
    assert search.best_params_ == {"logisticregression__C": best} == {"logisticregression__C": 1.0}
    refit = classifier(best).fit(X, labels)
    np.testing.assert_array_equal(search.predict(paths), refit.predict(X))
    assert search.score(paths, labels) == refit.score(X, labels) >= 0.9


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


def test_check_estimator_passes_with_honest_string_input_tags():
    from sklearn.utils import get_tags
    from sklearn.utils.estimator_checks import check_estimator

    tags = get_tags(ConvNetFeatures())
    assert tags.input_tags.string and not tags.input_tags.two_d_array and not tags.target_tags.required
    assert tags.transformer_tags.preserves_dtype == []  # strings in, float32 out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", estimator_checks.SkipTestWarning)
        check_estimator(ConvNetFeatures(backbone=TINY))


class _OneColumnFrame:
    """What matters of a one-column pandas DataFrame: iterating gives the column names, the array the values."""

    def __init__(self, paths):
        self.columns, self.shape, self._values = ["path"], (len(paths), 1), np.array(paths, dtype=object)[:, None]

    def __iter__(self):
        return iter(self.columns)

    def __array__(self, dtype=None, copy=None):
        return self._values


def test_array_likes_and_one_column_frames_are_read_as_paths(labelled_paths, tmp_path):
    from sklearn.utils.estimator_checks import _NotAnArray

    paths, _ = labelled_paths
    expected = _features(tmp_path).fit(paths).transform(paths)
    for X in (_NotAnArray(np.array(paths, dtype=object)), _OneColumnFrame(paths), np.array(paths)[:, None]):
        np.testing.assert_array_equal(_features(tmp_path).fit(X).transform(X), expected)
    with pytest.raises(ValueError, match="one column of image paths"):
        _features(tmp_path).fit(np.array([paths, paths]).T)


def test_a_one_column_dataframe_is_read_as_paths(labelled_paths, tmp_path):
    pd = pytest.importorskip("pandas")
    paths, _ = labelled_paths
    frame = pd.DataFrame({"path": paths})
    np.testing.assert_array_equal(
        _features(tmp_path).fit(frame).transform(frame), _features(tmp_path).fit(paths).transform(paths)
    )


def test_fit_loads_the_network_once_per_backbone(labelled_paths, tmp_path, monkeypatch):
    import featx.sklearn as sk

    loads = []
    original = sk.load_backbone

    def counting(name):
        loads.append(name)
        return original(name)

    monkeypatch.setattr(sk, "load_backbone", counting)
    sk.clear_network_cache()
    paths, _ = labelled_paths
    first = _features(tmp_path).fit(paths)
    clone(first).fit(paths)
    _features(tmp_path, layer="blocks.2").fit(paths)  # the same network, another layer
    second = _features(tmp_path).fit(paths)
    assert loads == [TINY] and second.spec_ == first.spec_
