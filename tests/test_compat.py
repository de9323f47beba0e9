"""Files written by the featx of commit c7c83b4 (``tests/fixtures/tiny/``) still read, and still read the same.

The fixtures are a store, a logistic-regression model and its results, a fine-tune's results and metadata,
and ``expected.json`` (what that featx computed from them); ``tests/fixtures/tiny/make_fixtures.py`` wrote them.
Every test works on a copy in ``tmp_path``: nothing here writes into ``tests/fixtures``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, make_image

import featx.store
from featx.classify import check_compatible, evaluate_model, load_model
from featx.extract import extract
from featx.jobs.report import collect, format_table, write_report
from featx.results import ClassifierResults, FinetuneResults, read_results
from featx.spec import ExtractionSpec, Preprocessing, cache_key

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tiny"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RESULTS = {"logreg": "logreg/results.json", "finetune": "finetune/results.json"}


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A copy of the fixtures (the store is opened, the report writes beside the results)."""
    copy = tmp_path / "tiny"
    shutil.copytree(FIXTURES, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return copy


def _sha256(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()


def _old_results(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / RESULTS[name]).read_text())


# ------------------------------------------------------------------------------------------------ the store
def test_old_store_opens_with_the_same_ids_splits_and_features(tiny):
    with featx.store.open(tiny / "store.h5") as store:
        assert store.key == EXPECTED["store_key"]
        assert store.ids() == EXPECTED["ids"]
        # The old featx wrote its carved test split into the store: read as the source's splits, it is kept,
        # and today's default split plan carves val from train.
        assert store.source_splits == EXPECTED["splits"]
        assert store.splits == {"train": 8, "val": 2, "test": 2}
        assert "test from the source" in store.split_policy
        features = store.features()
        assert features.dtype == np.float32 and features.shape[0] == len(EXPECTED["ids"])
        assert _sha256(features) == EXPECTED["features_sha256"]
        assert store.class_names == ["ant", "bee"]
        # The stored spec reads into today's ExtractionSpec and back to the same JSON, and today's key of it
        # (with the stored images' fingerprint) is the key the old featx wrote.
        assert store.spec.to_dict() == json.loads(store.attrs["spec"]) == _old_results("logreg")["store"]["spec"]
        assert cache_key(store.spec, store.attrs["manifest_fingerprint"]) == EXPECTED["store_key"]


def test_todays_extraction_of_the_same_images_gives_the_old_features(tmp_path):
    # The images of make_fixtures.py, generated again: same spec (weights checksum included), same numbers.
    images = tmp_path / "images"
    for c, name in enumerate(("ant", "bee")):
        for i in range(6):
            make_image(images / name / f"{i}.png", seed=50 * c + i, size=(40, 32))
    result = extract(images, TINY, out=tmp_path / "today.h5", progress=False, workers=0)
    with featx.store.open(FIXTURES / "store.h5") as old, featx.store.open(result.path) as new:
        assert new.spec == old.spec
        assert new.ids() == old.ids() and new.splits == old.splits
        # Bit-identical on the machine that wrote the fixtures; other CPUs may round convolutions differently.
        np.testing.assert_allclose(new.features(), old.features(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ cache key
def test_fixed_spec_keeps_its_cache_key():
    spec = ExtractionSpec.from_dict(EXPECTED["fixed_spec"])
    assert spec.to_dict() == EXPECTED["fixed_spec"]
    assert cache_key(spec, "f" * 64) == EXPECTED["fixed_spec_key"]
    # The same spec built field by field (make_fixtures.fixed_spec), so from_dict's defaults hide nothing.
    built = ExtractionSpec(
        backbone="torchvision:resnet50.IMAGENET1K_V2",
        weights="IMAGENET1K_V2",
        weights_sha256="ab" * 32,
        layers=("penultimate", "layer3"),
        preprocessing=Preprocessing((224, 224), 232, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        pool="avg",
    )
    assert built == spec and cache_key(built, "f" * 64) == EXPECTED["fixed_spec_key"]
    # That every field of the spec changes the key: tests/store/test_store.py::test_every_spec_field_changes_the_key.


# ------------------------------------------------------------------------------------------------ the model
def test_old_model_loads_accepts_the_store_and_predicts_the_same(tiny):
    model = load_model(tiny / "logreg" / "model.skops")
    old = _old_results("logreg")["test"]
    with featx.store.open(tiny / "store.h5") as store:
        check_compatible(model, store)
        assert model.class_names == store.class_names and model.layer == "penultimate"
        X, y = store.features(model.layer, split="test"), store.labels("test")
        predicted = model.predict(X)
        assert np.mean(predicted == y) == EXPECTED["test_accuracy"]
        confusion = np.zeros((2, 2), dtype=int)
        np.add.at(confusion, (y, predicted), 1)
        assert confusion.tolist() == old["confusion_matrix"]
        metrics = evaluate_model(model, store)
    # The accuracy's interval is Wilson's now (a percentile bootstrap when the fixture was written): everything
    # else the same, and the interval the one of the same counts.
    same = {k: v for k, v in old.items() if k not in ("predict_seconds", "accuracy_ci95")}
    assert json.loads(json.dumps({k: metrics[k] for k in same}, default=lambda o: o.tolist())) == same
    from featx.metrics import wilson_ci

    assert metrics["accuracy_ci95"] == list(wilson_ci(int(np.sum(predicted == y)), len(y)))


# ---------------------------------------------------------------------------------------------- the results
def test_old_results_are_read_by_the_report(tiny):
    # Laid out like a pipeline's run folder: out/cells/<cell>/results.json.
    out = tiny / "run"
    for name, rel in RESULTS.items():
        cell = out / "cells" / f"tiny__{name}"
        cell.mkdir(parents=True)
        shutil.copy(tiny / rel, cell / "results.json")
    rows = {row["kind"]: row for row in collect(out)}
    assert set(rows) == {"classifier", "finetune"}
    for kind, name in (("classifier", "logreg"), ("finetune", "finetune")):
        old, row = _old_results(name), rows[kind]
        assert row["method"] == old["method"]
        assert row["accuracy"] == old["test"]["accuracy"] == EXPECTED["test_accuracy"]
        assert row["ci"] == old["test"]["accuracy_ci95"] and row["macro_f1"] == old["test"]["macro_f1"]
        assert row["confusion"] == old["test"]["confusion_matrix"] and row["class_names"] == ["ant", "bee"]
    assert rows["classifier"]["chosen"] == "C=0.0001"
    assert rows["classifier"]["dataset"] == "store.h5"
    assert "logreg on frozen featx:tiny_test" in rows["classifier"]["how"]
    assert rows["finetune"]["chosen"] == "best epoch 1"
    assert "phases head 1 ep @ 0.01" in rows["finetune"]["how"]
    table = format_table(list(rows.values()))
    assert all(row["method"] in table for row in rows.values()) and "50.0 [0.0, 100.0]" in table
    # Old results hold no per-image predictions: the report names them and leaves them out of the verdict.
    assert "no per-image test predictions (written by an older featx): re-run it" in table
    assert "splits: not recorded (results of an older featx)" in table
    written = write_report(out)
    assert "finetune[head]" in written["html"].read_text()


def test_the_report_groups_cells_by_the_fields_their_results_record(tiny):
    # A run folder as today's main writes it: each cell's results.json carries the cell's fields. Rows named
    # like a seed or a split suffix ("seed1", "split1") are rows of their own, not runs of a "penultimate" row.
    out = tiny / "run"
    cells = {"seed1": 0, "seed2": 0, "split1": 0, "svm__seed1": 1}  # the last: the cell of row "svm", seed 1
    for folder, seed in cells.items():
        name = folder.split("__")[0]
        cell = {"id": f"classify/d/b/penultimate/{folder.replace('__', '/')}", "dataset": "d", "name": name}
        results = _old_results("logreg") | {"cell": cell | {"backbone": "b", "layer": "penultimate", "seed": seed}}
        (out / "cells" / f"d__b__penultimate__{folder}").mkdir(parents=True)
        (out / "cells" / f"d__b__penultimate__{folder}" / "results.json").write_text(json.dumps(results))
    keys = sorted(row["row_key"] for row in collect(out))
    assert keys == [f"classify/d/b/penultimate/{name}" for name in ("seed1", "seed2", "split1", "svm")]


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_old_results_match_the_typed_schema_in_every_section(tiny, name):
    # That read_results returns them unchanged: tests/test_results.py; here, that the TypedDicts describe them.
    results = read_results(tiny / RESULTS[name])
    _check_typed(results, {"logreg": ClassifierResults, "finetune": FinetuneResults}[name], name)


def _check_typed(value: Any, hint: Any, where: str) -> None:
    """Every key the typed schema requires is in the old file, in every nested section."""
    if typing.is_typeddict(hint):
        assert isinstance(value, dict), where
        missing = hint.__required_keys__ - value.keys()
        assert not missing, f"{where}: the old file lacks {sorted(missing)} that {hint.__name__} requires"
        hints = typing.get_type_hints(hint)
        for key, sub in value.items():
            if key in hints:
                _check_typed(sub, hints[key], f"{where}.{key}")
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or not args:
        return
    if origin is list:
        for i, item in enumerate(value):
            _check_typed(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        for key, item in value.items():
            _check_typed(item, args[1], f"{where}[{key!r}]")
    elif origin in (typing.Union, types.UnionType):
        typed = [a for a in args if typing.is_typeddict(a)]
        if len(typed) == 1:
            _check_typed(value, typed[0], where)


def test_the_typed_check_can_fail():
    old = _old_results("finetune")
    del old["curves"][0]["val_loss"]
    with pytest.raises(AssertionError, match=r"curves\[0\]: the old file lacks \['val_loss'\]"):
        _check_typed(old, FinetuneResults, "finetune")


# ------------------------------------------------------------------------------------------ fine-tune metadata
def test_old_finetune_metadata_rebuilds_the_network(tiny):
    # The weights were not kept (too large); write a state dict of the architecture finetune.json describes.
    from safetensors.torch import save_file

    from featx.backbones import load_backbone
    from featx.finetune import load_finetuned

    meta = json.loads((tiny / "finetune" / "finetune.json").read_text())
    net = load_backbone(meta["backbone"]).model
    head = net.get_submodule(meta["head"]["name"])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        setattr(net, meta["head"]["name"], torch.nn.Linear(head.in_features, len(meta["class_names"])))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tiny / "finetune" / "model.safetensors"))

    model, loaded = load_finetuned(tiny / "finetune")
    assert loaded == meta
    rebuilt = model.state_dict()  # the network's, under the wrapper's prefix, in the same order
    assert len(rebuilt) == len(state)
    for (key, value), (rebuilt_key, rebuilt_value) in zip(state.items(), rebuilt.items(), strict=True):
        assert rebuilt_key.endswith(key)
        torch.testing.assert_close(rebuilt_value, value, rtol=0, atol=0, msg=key)
    with torch.inference_mode():
        logits = model(torch.zeros(1, 3, *meta["preprocessing"]["input_size"]))
    assert logits.shape == (1, 2)


# ------------------------------------------------------------------------------------------ cell identities
# The cache key of every cell of pipelines/quickstart.toml (a store key, labels and source fingerprint fixed): a
# change here re-runs cached cells, so it must be deliberate and said. The classifier cells' keys are those
# featx b482b64 computed; the fine-tune cell's changed once, when the runner took the checkpoint's identity
# (FinetuneConfig.identity: without max_minutes and the options added later at their old value), and again when the
# LP-FT row took featx's default recipe and the probe's floored fold (issue 24: it trains differently).
QUICKSTART_CELLS = {
    "classify/digits/lite0/penultimate/svm": "1203328f7bdcc7a0080df6daba5335abfc48e6146eb9c5396a5c3d51f7134746",
    "classify/digits/lite0/penultimate/logreg": "cc270c716da28760c61990088259c56aac1eac82f009cc181611f81a815f07ce",
    "classify/digits/lite0/penultimate/knn": "42acfe85d94912c1df345ebdcf715a281108cd76da0186139f79d1b66a853426",
    "classify/digits/pixels/penultimate/svm": "1203328f7bdcc7a0080df6daba5335abfc48e6146eb9c5396a5c3d51f7134746",
    "classify/digits/pixels/penultimate/logreg-pixels": (
        "ec0d2cf69801c7d482dd64e8ed7165e929dae1f658bc9979fe4b09a65dc3619f"
    ),
    "classify/digits/pixels/penultimate/knn": "42acfe85d94912c1df345ebdcf715a281108cd76da0186139f79d1b66a853426",
    "classify/digits/pixels/penultimate/chance": "0f9636f25490bde4673a8f20a911653d4fe77e9a0437dcd3b043db94b5a6e215",
    "finetune/digits/lp-ft": "d52fe27091daebf738879425660a459e973116b55a646909bf72f15cdec67516",
}


def test_cell_cache_keys_of_the_quickstart_are_unchanged(monkeypatch, tmp_path):
    import featx.jobs.runner as runner
    import featx.store.format
    from featx.jobs import load_job
    from featx.jobs.planning import identity_hash, plan
    from featx.jobs.values import finetune_config

    monkeypatch.setattr(featx.store.format, "read_key", lambda path: "k" * 64)
    monkeypatch.setattr(featx.store.format, "read_labels_fingerprint", lambda path: "l" * 64)
    monkeypatch.setattr(runner, "_source_fingerprint", lambda source: "source")
    job = load_job(Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.toml")
    # An empty run folder: a quickstart already run in the checkout (as CI does first) has a probe cell whose
    # marker would enter the LP-FT cell's identity, as it should in a real run.
    job = dataclasses.replace(job, out=tmp_path / "quickstart")
    tasks = plan(job)
    states = {t.id: runner.TaskRun(t, store="store.h5") for t in tasks}
    keys = {}
    for task in tasks:
        if task.kind != "extract":
            identity = runner._cell_identity(job, task, states)
            keys[task.id] = identity_hash(identity)
            if task.kind == "finetune":  # the runner combines the identity the checkpoint hashes, never its own
                assert identity["config"] == finetune_config(task.finetune, task.seed).identity(
                    lp_ft=task.probe is not None
                )
    assert keys == QUICKSTART_CELLS
