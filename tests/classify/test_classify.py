"""Classifiers on cached features: presets, search, evaluation, few-shot, safe persistence, prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, synthetic_store

import featx.store
from featx.classify import PRESETS, ClassifierConfig, Preset, load_model, parse_preprocess, register_classifier, train
from featx.cli import main
from featx.exceptions import SpecMismatchError, UnknownNameError
from featx.metrics import evaluate, wilson_ci
from featx.predict import predict_images


@pytest.fixture
def blobs(tmp_path) -> Path:
    return synthetic_store(tmp_path / "blobs.h5")


def _train(store, **config):
    return train(store, ClassifierConfig(**config), n_jobs=1)


# ------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.param))  # chance: test_baselines.py
def test_every_preset_searches_refits_and_evaluates(blobs, name):
    model, results = _train(blobs, classifier=name)
    preset = PRESETS[name]
    search = results["search"]
    # The store's source gives train and test: the default split plan carves val (0.2 of each class) from train.
    assert search["param"] == preset.param and search["scheme"] == "validation split"
    # The coarse grid, in order, plus any widening at an edge; the refined values lie within a decade of the best.
    coarse = [p["value"] for p in search["curve"] if p["value"] not in search["widened"]]
    assert coarse == list(preset.grid)[: len(coarse)] and len(coarse) + len(search["skipped"]) == len(preset.grid)
    points = search["curve"] + search["refined"]
    assert all(len(p["folds"]) == 1 for p in points)
    best = max(sorted(points, key=lambda p: p["value"]), key=lambda p: p["mean"])
    assert search["best"] == best["value"]
    if preset.param in ("C", "alpha"):
        assert len(search["refined"]) >= 4 and search["converged"] in (True, False)
        coarse_best = max(search["curve"], key=lambda p: p["mean"])["value"]
        assert all(abs(np.log10(p["value"] / coarse_best)) <= 1 for p in search["refined"])
    else:
        assert search["refined"] == [] and search["best"] in preset.grid
    assert results["classifier"]["chosen"] == search["best"]
    test = results["test"]
    assert test["n"] == 48 and test["accuracy"] > 0.9
    lo, hi = test["accuracy_ci95"]
    assert lo <= test["accuracy"] <= hi
    assert set(test["per_class"]) == {"class0", "class1", "class2"}
    assert np.array(test["confusion_matrix"]).sum() == 48
    assert results["train"]["n"] == 72 - 15 and results["train"]["fit_seconds"] >= 0  # train only, never val
    assert results["split"]["sizes"] == {"train": 57, "val": 15, "test": 48}
    assert model.class_names == ["class0", "class1", "class2"]


def test_import_path_classifier_and_params(blobs):
    _, results = _train(blobs, classifier="sklearn.linear_model.LogisticRegression", params=(("max_iter", 200),))
    assert results["search"]["param"] == "C" and results["test"]["accuracy"] > 0.9
    _, fixed = _train(blobs, classifier="sklearn.tree.DecisionTreeClassifier")
    assert fixed["search"] is None and fixed["test"]["accuracy"] > 0.5
    with pytest.raises(UnknownNameError, match="cannot be imported"):
        _train(blobs, classifier="sklearn.nope.Thing")
    with pytest.raises(UnknownNameError, match="Did you mean: svm"):
        _train(blobs, classifier="svn")


def test_register_classifier_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_classifier(Preset("svm", "C", (1.0,), PRESETS["svm"].build))


def test_fixed_value_skips_the_search(blobs):
    _, results = _train(blobs, classifier="logreg", value=0.5)
    assert results["search"] is None and results["classifier"]["chosen"] == 0.5


def test_validation_split_is_used_for_the_search_and_the_refit_uses_train_only(tmp_path):
    store = synthetic_store(tmp_path / "v.h5", splits=(0.5, 0.25))
    _, results = _train(store, classifier="svm")
    assert results["search"]["scheme"] == "validation split"
    assert all(len(p["folds"]) == 1 for p in results["search"]["curve"])
    assert results["train"]["n"] == 60  # train alone: val chose C and is never fitted (SELECTION_RULE)


@pytest.mark.parametrize("preprocess", [(), ("l2",), ("standard",), ("pca:4",), ("l2", "standard", "pca:8")])
def test_preprocessing_options(blobs, preprocess):
    model, results = _train(blobs, classifier="logreg", preprocess=preprocess)
    assert [name for name, _ in model.pipeline.steps[:-1]] == [p.split(":")[0] for p in preprocess]
    assert results["test"]["accuracy"] > 0.8


def test_bad_configs_fail_before_training(blobs):
    with pytest.raises(ValueError, match="pca:K"):
        parse_preprocess("l2,zca")
    with pytest.raises(ValueError, match="class_weight"):
        _train(blobs, classifier="knn", class_weight="balanced")
    with pytest.raises(ValueError, match="cv must be an integer of at least 2; got 1"):
        _train(blobs, cv=1)
    with pytest.raises(ValueError, match=r"a number greater than 0; got -1\.0"):
        _train(blobs, value=-1.0)
    with pytest.raises(ValueError, match="sgd"):
        _train(blobs, classifier="svm", out_of_core=True)


def test_class_weight_balanced_helps_the_minority(tmp_path):
    store = synthetic_store(tmp_path / "imb.h5", n_classes=2, per_class=60, spread=3.0, seed=4)
    with featx.store.open(store) as s:
        assert s.splits["train"] == 58
    _, plain = _train(store, classifier="logreg", class_weight=None)
    _, balanced = _train(store, classifier="logreg", class_weight="balanced")
    assert balanced["classifier"]["class_weight"] == "balanced"
    assert balanced["test"]["balanced_accuracy"] >= plain["test"]["balanced_accuracy"] - 0.05


def test_same_config_gives_the_same_numbers(blobs):
    _, a = train(blobs, ClassifierConfig(classifier="sgd"), n_jobs=2)
    _, b = train(blobs, ClassifierConfig(classifier="sgd"), n_jobs=1)
    assert a["search"]["curve"] == b["search"]["curve"]
    for key in ("accuracy", "accuracy_ci95", "macro_f1", "confusion_matrix"):
        assert a["test"][key] == b["test"][key]


def test_seed_changes_the_folds(tmp_path):
    hard = synthetic_store(tmp_path / "hard.h5", spread=4.0)
    _, a = _train(hard, classifier="svm", seed=0)
    _, b = _train(hard, classifier="svm", seed=1)
    assert a["search"]["curve"] != b["search"]["curve"]


def test_few_shot_curve(blobs):
    _, results = train(blobs, ClassifierConfig(classifier="logreg"), n_jobs=1, shots=[1, 5, "all"], draws=3)
    curve = {p["shots"]: p for p in results["few_shot"]}
    assert set(curve) == {1, 5, "all"}
    assert curve[1]["draws"] == 3 and curve["all"]["draws"] == 1
    assert curve["all"]["mean"] == pytest.approx(results["test"]["accuracy"])
    assert curve[1]["std"] >= 0 and curve[1]["mean"] <= curve["all"]["mean"] + 0.05


def test_out_of_core_sgd_streams_bounded_blocks(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path / "big.h5", per_class=400, dims=8)
    seen = []
    original = featx.store.FeatureStore.read_rows

    def recording(self, rows, layer=None):
        seen.append(len(rows))
        return original(self, rows, layer)

    monkeypatch.setattr(featx.store.FeatureStore, "read_rows", recording)
    _, results = _train(store, classifier="sgd", out_of_core=True, preprocess=("l2", "standard"))
    assert results["classifier"]["out_of_core"] and results["search"]["scheme"] == "validation split (out of core)"
    assert results["test"]["accuracy"] > 0.9
    assert seen and max(seen) <= 32 * 256  # never the whole training set at once (720 rows here fit one buffer)
    assert results["train"]["n"] == 576  # train alone (0.2 of it carved as val)


def test_out_of_core_buffers_mix_classes():
    from featx.classify.training import _shuffled_buffers

    rows = np.arange(100_000)  # a store sorted by class: class = row // 10_000
    buffers = _shuffled_buffers(rows, np.random.default_rng(0))
    assert sum(len(b) for b in buffers) == 100_000
    assert len(np.unique(buffers[0] // 10_000)) >= 8


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_come_from_sklearn_and_ci_brackets_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, size=300)
    scores = rng.normal(size=(300, 8))
    scores[np.arange(300), y] += 1.5
    pred = scores.argmax(1)
    m = evaluate(y, pred, [f"c{i}" for i in range(8)], scores=scores)
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    assert m["accuracy"] == accuracy_score(y, pred)
    assert m["top5_accuracy"] == top_k_accuracy_score(y, scores, k=5)
    lo, hi = m["accuracy_ci95"]
    assert lo < m["accuracy"] < hi and hi - lo < 0.15
    assert wilson_ci(int((y == pred).sum()), y.size) == (lo, hi)
    # Unlike a percentile bootstrap, Wilson's interval does not collapse at 100 %: 49 of 49 is [0.927, 1].
    assert wilson_ci(49, 49) == pytest.approx((0.9273, 1.0), abs=1e-4)
    assert evaluate(y, pred, [f"c{i}" for i in range(8)])["top5_accuracy"] is None


# ------------------------------------------------------------------------------------- persistence
def test_model_round_trip_and_results_file(blobs, tmp_path):
    model, results = train(blobs, ClassifierConfig(classifier="knn"), n_jobs=1, out_dir=tmp_path / "knn")
    loaded = load_model(tmp_path / "knn" / "model.skops")
    with featx.store.open(blobs) as s:
        X = s.features(split="test")
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    written = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert written["test"]["accuracy"] == results["test"]["accuracy"]
    assert written["schema"] == "featx.results/1" and written["store"]["spec"]["backbone"] == TINY
    assert loaded.meta["store_spec"]["weights_sha256"] == "0" * 64


def test_model_refuses_a_store_with_another_spec(blobs, tmp_path):
    model, _ = _train(blobs, classifier="ridge")
    other = synthetic_store(tmp_path / "max.h5", pool="max")
    from featx.classify.training import evaluate_model

    with featx.store.open(other) as s, pytest.raises(SpecMismatchError, match=r"pool: 'avg' != 'max'"):
        evaluate_model(model, s)


class _Custom:
    def predict(self, X):
        return np.zeros(len(X), dtype=int)


def test_loading_never_runs_untrusted_code(blobs, tmp_path):
    import skops.io as sio

    model, _ = _train(blobs, classifier="ridge")
    path = model.save(tmp_path / "m.skops")
    assert load_model(path).meta["layer"] == "penultimate"
    # A file whose contents need a non-sklearn type is refused unless trusted.
    from featx.classify.model import MODEL_FORMAT

    meta = json.dumps(model.meta)
    sio.dump({"format": MODEL_FORMAT, "format_version": 1, "meta": meta, "pipeline": _Custom()}, tmp_path / "u.skops")
    with pytest.raises(ValueError, match="--trust"):
        load_model(tmp_path / "u.skops")
    assert isinstance(load_model(tmp_path / "u.skops", trust=True).pipeline, _Custom)
    (tmp_path / "pickle.skops").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="not a featx model file"):
        load_model(tmp_path / "pickle.skops")
    sio.dump({"something": 1}, tmp_path / "other.skops")
    with pytest.raises(ValueError, match="not a featx model"):
        load_model(tmp_path / "other.skops")
    sio.dump({"format": MODEL_FORMAT, "format_version": 99, "meta": "{}", "pipeline": 1}, tmp_path / "new.skops")
    with pytest.raises(ValueError, match="newer featx"):
        load_model(tmp_path / "new.skops")


def _edited_model(source: Path, target: Path, edit) -> Path:
    """A copy of a saved model whose skops ``schema.json`` went through ``edit`` (every other member kept)."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "schema.json":
                schema = json.loads(data)
                edit(schema["content"])
                data = json.dumps(schema).encode()
            zout.writestr(item, data)
    return target


def _json_node(value) -> dict:
    return {
        "__class__": "str",
        "__module__": "builtins",
        "__loader__": "JsonNode",
        "content": json.dumps(value),
        "is_json": True,
    }


def _edit_meta(change):
    def edit(content):
        meta = json.loads(json.loads(content["meta"]["content"]))
        change(meta)
        content["meta"] = _json_node(json.dumps(meta))

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(pipeline=_json_node("not a pipeline")), "its pipeline is a str, not a fitted scikit-learn"),
        (lambda c: c.update(meta=_json_node("{not json")), "its metadata is not JSON"),
        (lambda c: c.update(meta=_json_node("[1, 2]")), "its metadata is not a JSON object"),
        (lambda c: c.pop("meta"), "it has no metadata"),
        (lambda c: c.pop("pipeline"), "it has no pipeline"),
        (lambda c: c.update(format_version=_json_node("one")), "its format_version is 'one', not an integer"),
        (_edit_meta(lambda m: m.pop("store_spec")), "its metadata has no store_spec"),
        (_edit_meta(lambda m: m.update(store_spec="avg")), "its store_spec is not a feature-store spec"),
        (_edit_meta(lambda m: m.update(store_spec={"pool": "avg"})), "its store_spec is not a feature-store spec"),
        (_edit_meta(lambda m: m.update(class_names="ab")), "its class_names must be a list of strings"),
        (_edit_meta(lambda m: m.pop("layer")), "its metadata has no layer"),
    ],
)
def test_crafted_model_files_are_clear_errors(blobs, tmp_path, edit, message):
    model, _ = _train(blobs, classifier="ridge")
    saved = model.save(tmp_path / "m.skops")
    assert load_model(_edited_model(saved, tmp_path / "same.skops", lambda c: None)).layer == "penultimate"
    crafted = _edited_model(saved, tmp_path / "crafted.skops", edit)
    with pytest.raises(ValueError) as err:
        load_model(crafted)
    assert str(err.value).startswith(f"{crafted}: ") and message in str(err.value), str(err.value)
    result = CliRunner().invoke(main, ["evaluate", str(blobs), "--model", str(crafted)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_training_rows_without_labels_are_named_as_such(tmp_path):
    from featx.data import Manifest
    from featx.spec import ExtractionSpec, Preprocessing, cache_key
    from featx.store import StoreWriter

    n = 20
    ids = [f"img{i:02d}.png" for i in range(n)]
    manifest = Manifest(ids, ids, np.full(n, -1), ["train"] * n, ["a", "b"], "synthetic", "from source")
    spec = ExtractionSpec(
        backbone=TINY,
        weights="random-seed0",
        weights_sha256="0" * 64,
        layers=("penultimate",),
        preprocessing=Preprocessing((64, 64), 72, "bilinear", (0.5,) * 3, (0.5,) * 3),
    )
    fp = manifest.fingerprint()
    path = tmp_path / "unlabelled.h5"
    with StoreWriter(path, spec, cache_key(spec, fp), manifest, fp, {"penultimate": 4}) as w:
        w.write_batch(np.arange(n), {"penultimate": np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)})
        w.finalize({})
    for config in ({"classifier": "logreg"}, {"classifier": "sgd", "out_of_core": True}):
        with pytest.raises(ValueError, match=r"its 20 training rows \(train\) have no labels") as err:
            _train(path, **config)
        assert "single class" not in str(err.value)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_train_and_evaluate(blobs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "svm"
    result = runner.invoke(main, ["train", str(blobs), "--classifier", "svm", "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "chosen by validation split" in result.output and "<- chosen" in result.output
    assert "accuracy" in result.output and "95% CI" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["accuracy"] > 0.9
    evaluated = runner.invoke(
        main, ["evaluate", str(blobs), "--model", str(out / "model.skops"), "--out", str(tmp_path / "e.json")]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == results["test"]["accuracy"]
    # Another split seed moves images between train and val (the source's test split stays), and the model
    # remembers its plan: `evaluate` scores it on the test split of that plan.
    other = tmp_path / "svm-seed1"
    args = ["train", str(blobs), "-c", "svm", "--jobs", "1", "--split-seed", "1", "--out", str(other)]
    assert runner.invoke(main, args).exit_code == 0
    reseeded = json.loads((other / "results.json").read_text())
    assert reseeded["split"]["plan"]["split_seed"] == 1
    assert reseeded["split"]["hashes"]["test"] == results["split"]["hashes"]["test"]
    assert reseeded["split"]["hashes"]["train"] != results["split"]["hashes"]["train"]
    assert load_model(other / "model.skops").split_plan.split_seed == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classifier", "ridge", "--C", "1"], "use --alpha"),
        (["--classifier", "svm", "--C", "-1"], "value must be auto or a number greater than 0; got '-1'"),
        (["--grid", "a,b"], "grid must be a list of 1 or more items, each a number greater than 0, e.g. 0.01,0.1,1,10"),
        (["--preprocess", "zca"], "pca:K"),
        (["--shots", "0"], "each a positive integer (images per class) or all"),
        (["--param", "oops"], "NAME=VALUE"),
        (["--classifier", "knn", "--class-weight", "balanced"], "class_weight"),
    ],
)
def test_cli_train_validates_options(blobs, tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", str(blobs), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "o" / "model.skops").exists()


def test_predict_end_to_end_with_bad_files(image_folder, tmp_path):
    from featx.extract import extract

    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    model, _ = train(store, ClassifierConfig(classifier="logreg", value=1.0), out_dir=tmp_path / "m")
    good = [image_folder / "cat" / "00.png", image_folder / "emu" / "05.png"]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    predictions = predict_images([*good, bad], model, top_k=2, workers=0)
    assert [p.error is None for p in predictions] == [True, True, False]
    assert "not an image" in predictions[2].error
    assert all(p.label in model.class_names and len(p.top_k) == 2 for p in predictions[:2])
    # Same images, same classifier applied to the training store's rows: identical predictions.
    with featx.store.open(store) as s:
        ids = s.ids()
        X = s.features()
    expected = model.predict(X[[ids.index("cat/00.png"), ids.index("emu/05.png")]])
    assert [p.label for p in predictions[:2]] == [model.class_names[i] for i in expected]

    result = CliRunner().invoke(
        main,
        [
            "predict",
            *map(str, good),
            str(bad),
            "--model",
            str(tmp_path / "m" / "model.skops"),
            "--top-k",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 3
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(lines) == 3 and lines[2]["error"] and lines[0]["class"] in model.class_names


def test_predict_refuses_changed_weights(image_folder, tmp_path):
    from featx.extract import extract

    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    model, _ = train(store, ClassifierConfig(classifier="ridge", value=1.0))
    model.meta["store_spec"]["weights_sha256"] = "f" * 64
    with pytest.raises(SpecMismatchError, match="changed since the features were made"):
        predict_images([image_folder / "cat" / "00.png"], model, workers=0)


def test_predict_with_a_model_trained_on_fast_decoded_features(image_folder, tmp_path):
    from featx.extract import extract

    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, decode="fast", progress=False).path
    model, _ = train(store, ClassifierConfig(classifier="ridge", value=1.0))
    assert model.meta["store_spec"]["decode"] == "fast"
    (prediction,) = predict_images([image_folder / "cat" / "00.png"], model, workers=0)
    assert prediction.error is None and prediction.label in model.class_names


# ------------------------------------------------------------------------------- real data (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["svm", "logreg"])
def test_hymenoptera_svm_and_logreg_reach_094(hymenoptera_store, name):
    _, results = train(hymenoptera_store, ClassifierConfig(classifier=name), n_jobs=-1)
    assert results["test"]["n"] == 153
    assert results["test"]["accuracy"] >= 0.94, results["search"]
    assert results["search"]["seconds"] < 60


def test_cli_out_of_core_flag(blobs, tmp_path):
    result = CliRunner().invoke(main, ["train", str(blobs), "-c", "sgd", "--out-of-core", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["classifier"]["out_of_core"] is True


def test_metrics_ignore_classes_absent_from_test_and_predictions():
    m = evaluate(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), ["a", "b", "c"])
    assert m["macro_f1"] == 1.0 and m["accuracy"] == 1.0


def test_unseen_classes_get_finite_scores_and_top5_works(tmp_path):
    from featx.classify.model import _expand_scores

    scores = _expand_scores(np.array([[0.2, -1.0]]), np.array([0, 2]), 7)
    assert np.isfinite(scores).all() and scores[0].argmax() == 0 and scores[0, 1] < -1.0
    m = evaluate(np.array([0, 2]), np.array([0, 2]), [f"c{i}" for i in range(7)], scores=np.vstack([scores, scores]))
    assert m["top5_accuracy"] == 1.0


def test_knn_grid_larger_than_a_fold(tmp_path):
    store = synthetic_store(tmp_path / "small.h5", per_class=8)
    _, results = _train(store, classifier="knn", grid=(1.0, 50.0), cv=2)
    assert results["test"]["accuracy"] > 0.5


def test_out_of_core_refuses_class_weights(blobs):
    with pytest.raises(ValueError, match="cannot weight classes"):
        _train(blobs, classifier="sgd", out_of_core=True, class_weight="balanced")


@pytest.mark.slow  # ~4 s: one extraction, two fits, four predictions
def test_predict_says_whether_its_scores_are_probabilities_or_margins(image_folder, tmp_path):
    from featx.extract import extract

    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    image = str(image_folder / "cat" / "00.png")
    for name, kind in (("logreg", "probability"), ("svm", "margin")):
        train(store, ClassifierConfig(classifier=name, value=1.0), out_dir=tmp_path / name)
        args = ["predict", image, "--model", str(tmp_path / name / "model.skops"), "--top-k", "3"]
        text = CliRunner().invoke(main, args)
        assert text.exit_code == 0, text.output
        header, row = text.stdout.splitlines()[-2:]
        assert header.split("\t")[:3] == ["path", "class", kind] and row.startswith(image)
        line = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout.splitlines()[-1])
        assert line["score_kind"] == kind and line["class"] == line["top_k"][0][0]
        if kind == "probability":
            assert abs(sum(s for _, s in line["top_k"]) - 1) < 1e-6


def test_the_preprocess_help_names_each_presets_default():
    from featx.classify import PRESETS

    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    for name, preset in PRESETS.items():
        default = ",".join(preset.preprocess) or "none"
        assert f"{name}: {default}" in help_text, (name, default)
