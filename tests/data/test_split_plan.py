"""The split plan (issue 14): one train / val / test per dataset, applied on reading, never in a store's key."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY, TINY_ROW, make_image, pipeline_toml

import featx.extract.api
import featx.store
import featx.store.writer
from featx.classify import ClassifierConfig, load_model, train
from featx.data import from_folder
from featx.data.splits import SplitPlan, split_hashes
from featx.exceptions import IncompleteStoreError, SpecMismatchError
from featx.extract import extract
from featx.jobs import load_job, run


def _job(path: Path, out: Path, data: Path, split_seed: int, probe: bool = True) -> Path:
    lpft = {"name": "lpft", "backbone": "tiny", "phases": "head:1:1e-2", "batch_size": 8}
    return pipeline_toml(
        path,
        name="plan",
        out=out,
        datasets=[{"name": "colours", "source": data, "split_seed": split_seed}],
        backbones=[TINY_ROW],
        classifiers=[{"name": "logreg", "classifier": "logreg"}, {"name": "knn", "classifier": "knn"}],
        finetune=[{**lpft, "init_head": "logreg"} if probe else lpft],
    )


def _no_extraction(*args, **kwargs):
    raise AssertionError("the features depend on the images only: nothing may be extracted again")


# ------------------------------------------------------------------------------------------ the plan
def test_the_plan_depends_on_the_ids_and_the_split_seed_only():
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}.png" for i in range(60)]
    labels = np.repeat([0, 1, 2], 20)
    plan = SplitPlan(split_seed=7, val_fraction=0.25, test_fraction=0.2)
    splits, policy = plan.assign(ids, labels, ["train"] * 60)
    assert "split seed 7" in policy and "test carved from train (0.2 per class)" in policy
    for c in range(3):  # stratified: 4 test, then 4 of the 16 left as val, per class
        assert list(splits[labels == c]).count("test") == 4 and list(splits[labels == c]).count("val") == 4
    order = rng.permutation(60)  # the rows in another order: every image lands in the same split
    shuffled, _ = plan.assign([ids[i] for i in order], labels[order], ["train"] * 60)
    assert dict(zip([ids[i] for i in order], shuffled, strict=True)) == dict(zip(ids, splits, strict=True))
    other, _ = SplitPlan(split_seed=8, val_fraction=0.25, test_fraction=0.2).assign(ids, labels, ["train"] * 60)
    assert list(other) != list(splits)
    hashes = split_hashes(ids, splits)
    assert set(hashes) == {"train", "val", "test"} and hashes["test"].startswith("12:")
    assert split_hashes(list(reversed(ids)), list(reversed(splits))) == hashes  # a set of ids, not a sequence


def test_a_source_test_split_is_kept_and_unlabelled_rows_never_move():
    ids = [f"{i}" for i in range(12)]
    labels = np.array([0] * 5 + [1] * 5 + [-1, -1])
    source = ["train"] * 4 + ["test"] + ["train"] * 4 + ["test"] + ["unlabeled"] * 2
    splits, policy = SplitPlan(val_fraction=0.25).assign(ids, labels, source)
    assert policy.startswith("test from the source; val carved from train (0.25 per class)")
    assert [s for s, was in zip(splits, source, strict=True) if was == "test"] == ["test", "test"]
    assert list(splits[-2:]) == ["unlabeled", "unlabeled"] and list(splits).count("val") == 2


# ------------------------------------------------------------------------------------- reuse of a store
def test_a_new_split_plan_opens_the_same_store(image_folder, tmp_path):
    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    plans = [SplitPlan(), SplitPlan(split_seed=1), SplitPlan(val_fraction=0.4, test_fraction=0.3)]
    seen = []
    for plan in plans:
        with featx.store.open(store, plan) as fs:
            assert fs.source_splits == {"train": 18} and fs.plan == plan
            seen.append(fs.split_hashes)
            assert sum(fs.splits.values()) == 18 and fs.splits["test"] == 3 * round(6 * plan.test_fraction)
    assert len({json.dumps(h, sort_keys=True) for h in seen}) == 3


def test_relabelled_csv_reuses_the_features(tmp_path, monkeypatch):
    for i in range(8):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
    rows = [f"img/{i}.png,{'ab'[i % 2]},{'test' if i >= 6 else 'train'}" for i in range(8)]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    first = extract(tmp_path / "m.csv", TINY, out=tmp_path / "s.h5", workers=0, progress=False)
    with featx.store.open(first.path) as fs:
        features, labels = fs.features(), fs.labels()
    relabelled = [r.replace(",a,", ",x,").replace(",b,", ",a,").replace(",x,", ",b,") for r in rows]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(relabelled) + "\n")
    monkeypatch.setattr(featx.store.writer.StoreWriter, "__init__", _no_extraction)
    again = extract(tmp_path / "m.csv", TINY, out=tmp_path / "s.h5", workers=0, progress=False)
    assert again.cached and again.key == first.key
    with featx.store.open(again.path) as fs:
        np.testing.assert_array_equal(fs.features(), features)
        np.testing.assert_array_equal(fs.labels(), 1 - labels)


def test_an_interrupted_label_update_is_detected_and_redone(image_folder, tmp_path):
    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    with h5py.File(store, "r+") as f:
        f.attrs["labels_fingerprint"] = ""  # what a crash between blanking and setting it leaves
        del f["labels"]  # cut after removing the old labels, before writing the new ones
    with pytest.raises(IncompleteStoreError, match="labels was interrupted; re-run the `featx extract`"):
        featx.store.open(store)
    assert extract(image_folder, TINY, out=store, workers=0, progress=False).cached
    with featx.store.open(store) as fs:
        assert fs.attrs["labels_fingerprint"] == from_folder(image_folder).labels_fingerprint()


def test_a_store_of_the_previous_format_is_re_keyed_not_extracted(image_folder, tmp_path, monkeypatch):
    result = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False)
    with h5py.File(result.path, "r+") as f:  # as format 1 wrote it: labels and splits hashed into the key
        f.attrs["featx_format_version"] = 1
        f.attrs["key"] = "0" * 64
        f.attrs["manifest_fingerprint"] = "stat:" + "1" * 64
        del f.attrs["labels_fingerprint"]
    monkeypatch.setattr(featx.store.writer.StoreWriter, "__init__", _no_extraction)
    again = extract(image_folder, TINY, out=result.path, workers=0, progress=False)
    assert again.cached and again.key == result.key
    with featx.store.open(result.path) as fs:
        assert fs.key == result.key and fs.attrs["featx_format_version"] == 2


def test_only_a_format_1_store_is_offered_the_migration(image_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(featx.extract.api, "migrate_format_1", lambda *a: calls.append(a) or False)
    store = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    extract(image_folder, TINY, out=store, pool="max", overwrite=True, workers=0, progress=False)  # another key
    assert not calls  # a format-2 store of another spec is replaced, never tried as an old one
    with h5py.File(store, "r+") as f:
        f.attrs["featx_format_version"] = 1
    extract(image_folder, TINY, out=store, pool="max", overwrite=True, workers=0, progress=False)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------- leakage
def test_the_leaking_chain_is_refused(colour_folder, tmp_path):
    """A probe trained under one split plan, then a fine-tune under another: its head has seen the fine-tune's
    val and test images, so it is refused, naming the fix."""
    from featx.finetune import FinetuneConfig, finetune, parse_phases

    store = extract(colour_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    train(store, ClassifierConfig(classifier="logreg", value=1.0), plan=SplitPlan(split_seed=0), out_dir=tmp_path / "p")
    assert load_model(tmp_path / "p" / "model.skops").split_plan == SplitPlan(split_seed=0)
    config = FinetuneConfig(phases=tuple(parse_phases("head:1:1e-2")), batch_size=8, seed=1)
    with pytest.raises(SpecMismatchError, match=r"another split plan: its train, val, test image\(s\) differ") as err:
        finetune(
            colour_folder,
            TINY,
            config,
            tmp_path / "ft",
            init_head=tmp_path / "p" / "model.skops",
            plan=SplitPlan(split_seed=1),
            workers=0,
            progress=False,
        )
    assert "--split-seed" in str(err.value)
    assert not (tmp_path / "ft" / "results.json").exists()


def test_a_probe_without_a_split_plan_is_refused(tmp_path):
    from pathlib import Path

    import featx.backbones as B
    from featx.finetune import head_from_logreg

    old = Path(__file__).parents[1] / "fixtures" / "tiny" / "logreg" / "model.skops"
    with pytest.raises(SpecMismatchError, match="records no split plan"):
        head_from_logreg(old, B.load_backbone(TINY), ["ant", "bee"], split_hashes={"train": "1:x"})


# -------------------------------------------------------------------------------------------- pipelines
def _results(out) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/results.json"))}


def test_every_row_shares_the_plan_and_a_new_split_seed_extracts_nothing(colour_folder, tmp_path, monkeypatch):
    job_file = tmp_path / "job.toml"
    out = tmp_path / "out"
    _job(job_file, out, colour_folder, split_seed=0)
    assert [t.status for t in run(load_job(job_file), progress=False).tasks] == ["done"] * 4
    first = _results(out)
    assert len(first) == 3
    hashes = {json.dumps(r["split"]["hashes"], sort_keys=True) for r in first.values()}
    assert len(hashes) == 1  # classifiers and the fine-tune: the same train, val and test images
    assert {r["split"]["rule"] for r in first.values()} == {featx.data.splits.SELECTION_RULE}

    _job(job_file, out, colour_folder, split_seed=3)
    monkeypatch.setattr(featx.store.writer.StoreWriter, "__init__", _no_extraction)
    second = run(load_job(job_file), progress=False)
    assert [t.status for t in second.tasks] == ["cached", "done", "done", "done"], [t.message for t in second.tasks]
    again = _results(out)
    assert len({json.dumps(r["split"]["hashes"], sort_keys=True) for r in again.values()}) == 1
    assert next(iter(again.values()))["split"]["hashes"] != next(iter(first.values()))["split"]["hashes"]
    assert {r["split"]["plan"]["split_seed"] for r in again.values()} == {3}


def test_a_relabelled_csv_re_runs_every_row_of_a_pipeline_but_extracts_nothing(colour_folder, tmp_path, monkeypatch):
    rows = [f"{p},{p.parent.name}" for p in sorted(colour_folder.rglob("*.png"))]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    job_file, out = tmp_path / "job.toml", tmp_path / "out"
    # A fine-tune without a probe: only the labels themselves can tell it to re-run.
    _job(job_file, out, csv, split_seed=0, probe=False)
    assert [t.status for t in run(load_job(job_file), progress=False).tasks] == ["done"] * 4
    assert [t.status for t in run(load_job(job_file), progress=False).tasks] == ["cached"] * 4
    relabelled = [r.rsplit(",", 1)[0] + ",crimson" if i == 0 else r for i, r in enumerate(rows)]  # one image
    csv.write_text("path,label\n" + "\n".join(relabelled) + "\n")
    monkeypatch.setattr(featx.store.writer.StoreWriter, "__init__", _no_extraction)
    # A dry run writes nothing (the store keeps its old labels) and still plans every row that will re-run.
    planned = run(load_job(job_file), progress=False, dry_run=True)
    assert [t.status for t in planned.tasks] == ["cached", "planned", "planned", "planned"]
    again = run(load_job(job_file), progress=False)
    assert [t.status for t in again.tasks] == ["cached", "done", "done", "done"], [t.message for t in again.tasks]
