"""Refit on train+val (issue 24): every row kind fits its final model again on train and val with what val chose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_ROW, pipeline_toml
from safetensors.torch import load_file

from featx.classify import ClassifierConfig, train
from featx.classify.model import load_model
from featx.data.splits import SELECTION_RULE, FinalFit, selection_rule
from featx.exceptions import InvalidOptionError, SpecMismatchError
from featx.finetune import FinetuneConfig, finetune, parse_phases
from featx.finetune.refit import epochs_to_refit
from featx.finetune.state import RunState


@pytest.fixture
def store(colour_folder, tmp_path) -> Path:
    from featx.extract import extract

    return extract(colour_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path


def _config(phases: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(phases=tuple(parse_phases(phases)), batch_size=8, **kw)


def test_the_option_is_checked_and_words_the_rule():
    assert FinalFit("train+val").refit == "train+val" and FinalFit().refit == "train"
    assert selection_rule("train") == SELECTION_RULE
    assert "train+val" in selection_rule("train+val") and "no refit" not in selection_rule("train+val")
    with pytest.raises(InvalidOptionError, match=r"'val'.*train, train\+val"):
        FinalFit("val")  # the table's one check, whichever way the value came


# ------------------------------------------------------------------------------------------ frozen rows
@pytest.mark.parametrize("classifier", ["logreg", "knn"])
def test_a_frozen_row_refits_with_the_chosen_value_on_train_and_val(store, tmp_path, classifier):
    _, plain = train(store, ClassifierConfig(classifier=classifier), out_dir=tmp_path / "a", n_jobs=1)
    _, refit = train(
        store, ClassifierConfig(classifier=classifier), out_dir=tmp_path / "b", n_jobs=1, refit="train+val"
    )
    sizes = plain["split"]["sizes"]
    assert plain["train"]["n"] == sizes["train"] and "refit" not in plain["split"]  # the default is unchanged
    assert refit["train"]["n"] == sizes["train"] + sizes["val"]
    assert refit["split"]["refit"] == "train+val" and refit["split"]["rule"] == selection_rule("train+val")
    assert refit["classifier"]["chosen"] == plain["classifier"]["chosen"]  # val chose the same, before the refit
    # The fit on train alone is kept beside it (an LP-FT's run on train starts from it), and says so.
    on_train = load_model(tmp_path / "b" / "model-train.skops")
    assert on_train.meta["trained_on"]["splits"] == ["train"] and on_train.meta["trained_on"]["n"] == sizes["train"]
    assert load_model(tmp_path / "b" / "model.skops").meta["trained_on"]["splits"] == ["train", "val"]
    assert not (tmp_path / "a" / "model-train.skops").exists()


def test_an_out_of_core_row_refits_on_train_and_val(store, tmp_path):
    config = ClassifierConfig(classifier="sgd", out_of_core=True, value=1e-3)
    _, refit = train(store, config, n_jobs=1, refit="train+val")
    sizes = refit["split"]["sizes"]
    assert refit["train"]["n"] == sizes["train"] + sizes["val"] and refit["split"]["refit"] == "train+val"


# ------------------------------------------------------------------------------------------- fine-tunes
def test_epochs_to_refit_counts_each_phase_up_to_the_best_epoch():
    state = RunState("h", best_epoch=3)
    state.curves = [
        {"epoch": 0, "phase": 0},
        {"epoch": 1, "phase": 1},
        {"epoch": 2, "phase": 1},  # patience cut phase 1 here: its third epoch never ran
        {"epoch": 4, "phase": 2},
        {"epoch": 5, "phase": 2},
    ]
    state.best_epoch = 4
    assert epochs_to_refit(state, 2) == [2, 1]
    state.best_epoch = 0
    assert epochs_to_refit(state, 2) == [0, 0]


def test_a_fine_tune_retrains_on_train_and_val_for_the_chosen_rate_and_epochs(colour_folder, tmp_path):
    config = _config("head:1:auto,all:1:auto/2", lr_candidates=(1e-2, 3e-2))
    plain = finetune(colour_folder, TINY, config, tmp_path / "a", workers=0, progress=False)
    refit = finetune(colour_folder, TINY, config, tmp_path / "b", workers=0, progress=False, refit="train+val")
    sizes = plain["split"]["sizes"]
    assert "refit" not in plain and "refit" not in plain["split"]
    # The run on train is the same run: the same rate and epoch chosen on val.
    assert refit["lr_sweep"]["chosen"] == plain["lr_sweep"]["chosen"] and refit["best_epoch"] == plain["best_epoch"]
    assert refit["refit"]["on"] == "train+val" and refit["refit"]["n"] == sizes["train"] + sizes["val"]
    assert refit["refit"]["epochs"] == plain["best_epoch"] and refit["split"]["refit"] == "train+val"
    # The tested weights are the refit's, not the best epoch of the run on train.
    if plain["best_epoch"]:
        a, b = (
            load_file(str(tmp_path / "a" / "model.safetensors")),
            load_file(str(tmp_path / "b" / "model.safetensors")),
        )
        assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # Another refit is another run: its checkpoint is not resumed as the default's.
    with pytest.raises(SpecMismatchError, match="other settings"):
        finetune(colour_folder, TINY, config, tmp_path / "b", workers=0, progress=False)


def test_lp_ft_refits_from_the_probe_refit_on_train_and_val(store, colour_folder, tmp_path):
    train(store, ClassifierConfig(classifier="logreg", value=1.0), out_dir=tmp_path / "probe", n_jobs=1)
    train(
        store, ClassifierConfig(classifier="logreg", value=1.0), out_dir=tmp_path / "both", n_jobs=1, refit="train+val"
    )
    config = _config("head:1:1e-12", weight_decay=0.0)
    # Under refit "train", a probe that has seen val would judge its own epoch 0 on val: refused.
    with pytest.raises(SpecMismatchError, match="fit on train\\+val"):
        finetune(colour_folder, TINY, config, tmp_path / "x", init_head=tmp_path / "both" / "model.skops", workers=0)
    # Under refit "train+val", a probe without its fit on train alone is refused, saying what to give.
    with pytest.raises(FileNotFoundError, match=r"model-train\.skops"):
        finetune(
            colour_folder, TINY, config, tmp_path / "y", init_head=tmp_path / "probe" / "model.skops",
            workers=0, refit="train+val",
        )  # fmt: skip
    results = finetune(
        colour_folder, TINY, config, tmp_path / "z", init_head=tmp_path / "both" / "model.skops",
        workers=0, progress=False, refit="train+val",
    )  # fmt: skip
    # The run on train started from the train-only probe; the refit (epochs at a vanishing rate) from the train+val
    # probe, so the tested head is that regression.
    assert results["finetune"]["init_head"].endswith("model-train.skops")
    from featx.backbones import load_backbone
    from featx.finetune import head_from_logreg

    net = load_backbone(TINY)
    W, _ = head_from_logreg(
        tmp_path / "both" / "model.skops",
        net,
        ["blue", "green", "red"],
        fitted_on=("train", "val"),
        scale_floor=config.probe_scale_floor,  # the fold the run makes
    )
    saved = load_file(str(tmp_path / "z" / "model.safetensors"))
    np.testing.assert_allclose(saved["classifier.weight"].numpy(), W.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------- jobs
def _job(path: Path, out: Path, data: Path, **refit: str) -> Path:
    ft = {"name": "ft", "backbone": "tiny", "phases": "head:1:1e-2", "batch_size": 8}
    return pipeline_toml(
        path,
        name="refit",
        out=out,
        datasets=[{"name": "colours", "source": data, **refit}],
        backbones=[TINY_ROW],
        classifiers=[{"name": "logreg", "classifier": "logreg", "value": 1.0}],
        finetune=[{**ft, "name": "lpft", "init_head": "logreg"}, ft],
    )


@pytest.mark.slow
def test_a_job_refits_every_row_kind_and_records_it(colour_folder, tmp_path):
    from featx.jobs.report import collect
    from featx.jobs.runner import run
    from featx.jobs.schema import load_job

    path = _job(tmp_path / "job.toml", tmp_path / "out", colour_folder, refit="train+val")
    run(load_job(path), progress=False)
    rows = {r["method"].split(" ")[0].split("[")[0]: r for r in collect(tmp_path / "out")}
    assert set(rows) == {"logreg", "lp-ft", "finetune"}
    for row in rows.values():
        assert row["split"]["refit"] == "train+val" and "final model refit on train+val" in row["how"]
    identities = [json.loads(p.read_text())["identity"] for p in (tmp_path / "out" / "cells").glob("*/cell.json")]
    assert len(identities) == 3 and all(i["refit"] == "train+val" for i in identities)


def test_a_job_with_the_default_refit_keeps_its_cell_identities(colour_folder, tmp_path):
    from featx.jobs.planning import plan
    from featx.jobs.runner import _cell_identity
    from featx.jobs.schema import JobError, load_job

    path = _job(tmp_path / "job.toml", tmp_path / "out", colour_folder)
    job = load_job(path)
    finetunes = [t for t in plan(job) if t.kind == "finetune"]
    for task in finetunes:
        identity = _cell_identity(job, task, {})
        assert "refit" not in identity and "refit" not in identity["dataset"]  # the hash of cells cached before
        # The LP-FT floor is in the LP-FT cell's identity only: the plain fine-tune's cached cell keeps its hash.
        assert ("probe_scale_floor" in identity["config"]) == (task.probe is not None)
    assert {t.probe is not None for t in finetunes} == {True, False}
    _job(path, tmp_path / "out", colour_folder, refit="val")
    with pytest.raises(JobError, match=r"job.toml:8: unknown refit 'val'.*train, train\+val"):
        load_job(path)


def test_cli_train_and_finetune_take_refit(store, colour_folder, tmp_path):
    from click.testing import CliRunner

    from featx.cli import main

    runner = CliRunner()
    out = runner.invoke(
        main, ["train", str(store), "-c", "logreg", "--C", "1", "--refit", "train+val", "-o", str(tmp_path / "lr")]
    )
    assert out.exit_code == 0, out.output
    assert "then fit again on train+val" in out.output and (tmp_path / "lr" / "model-train.skops").exists()
    args = [
        "finetune",
        str(colour_folder),
        "-b",
        TINY,
        "--phases",
        "head:1:1e-2",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ]
    out = runner.invoke(main, [*args, "--no-progress", "--refit", "train+val", "-o", str(tmp_path / "ft")])
    assert out.exit_code == 0, out.output
    assert "refit on train+val" in out.output
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["split"]["refit"] == "train+val"
    out = runner.invoke(main, [*args, "--refit", "val", "-o", str(tmp_path / "x")])
    assert out.exit_code != 0 and "train+val" in out.output


def test_refit_is_one_table_option_on_train_and_finetune_only():
    """``--refit`` comes from FinalFit's table; the split plan (which ``extract`` and a store take too) has no refit."""
    from click.testing import CliRunner

    from featx._runtime.params import options_of
    from featx.cli import main
    from featx.data.splits import SplitPlan
    from featx.jobs.values import config_keys

    assert "refit" not in options_of(SplitPlan) and "refit" in config_keys("datasets")
    for command, has in (("train", True), ("finetune", True), ("extract", False)):
        shown = CliRunner().invoke(main, [command, "--help"]).output
        assert ("--refit" in shown) is has, command
