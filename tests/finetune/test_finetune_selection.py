"""Fine-tuning tuned like the probe: the learning rate chosen on val, resumable mid-choice, capped in time."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, start_slow_finetune
from safetensors.torch import load_file

from featx.cli import main
from featx.finetune import FinetuneConfig, Phase, finetune, parse_phases
from featx.finetune.sweep import sweep_order

#: On the colour folder the tiny network's val loss falls fastest at 1e-1; 1e3 diverges, 1e-5 and 1e-3 barely
#: move. Tried in the order 1e-3, 1e-5, 1e-1, 1e3: the best is neither the first nor the last tried.
CANDIDATES = (1e-5, 1e-3, 1e-1, 1e3)


def _config(phases: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(phases=tuple(parse_phases(phases)), batch_size=8, **kw)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """The kept weights (a finished run's checkpoint holds none; the tests compare the curves too)."""
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- options
def test_auto_rates_in_phases_and_lr_auto():
    assert parse_phases("head:1:auto,all:3:auto/10,top1:1:auto*2") == [
        Phase("head", 1, 1.0, auto=True),
        Phase("all", 3, 0.1, auto=True),
        Phase("top1", 1, 2.0, auto=True),
    ]
    relative = _config("head:3:1e-2,all:2:1e-3", lr="auto")  # the phases give the ratios
    assert [(p.lr, p.auto) for p in relative.phases] == [(1.0, True), (pytest.approx(0.1), True)]
    assert relative.sweeps and relative.candidates == (1e-3, 3e-3, 1e-2)
    assert _config("all:1:auto", optimizer="adamw").candidates == (1e-4, 3e-4, 1e-3)
    fixed = _config("head:3:1e-2")
    assert not fixed.sweeps and fixed.phases[0].rate(None) == 1e-2 and "auto" not in fixed.to_dict()["phases"][0]
    for kw, message in [
        ({"phases": "head:1:auto,all:1:1e-3", "lr": "auto"}, "give the others as auto"),
        ({"phases": "head:1:1e-3", "lr": "sometimes"}, "unknown lr 'sometimes'. Choose one of phases, auto"),
        ({"phases": "head:1:1e-3", "lr_candidates": (1e-3, 1e-2)}, "no rate is chosen"),
        ({"phases": "head:1:1e-3", "max_minutes": 5.0}, "no rate is chosen"),
        ({"phases": "head:1:auto", "lr_candidates": (1e-3,)}, "lr_candidates must be two or more rates"),
        ({"phases": "head:1:auto", "lr_candidates": (1e-3, -1.0)}, "each a number greater than 0"),
        ({"phases": "head:1:auto", "max_minutes": 0}, "max_minutes must be a number greater than 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            _config(**kw)
    with pytest.raises(ValueError, match="not a learning rate"):
        parse_phases("head:1:automatic")


def test_candidates_are_tried_from_the_middle_outwards():
    assert sweep_order((1e-3, 3e-3, 1e-2)) == [3e-3, 1e-3, 1e-2]
    assert sweep_order(CANDIDATES) == [1e-3, 1e-5, 1e-1, 1e3]
    assert sweep_order((1.0, 2.0)) == [1.0, 2.0]


# -------------------------------------------------------------------------------------------- choice
def test_the_best_val_rate_is_chosen_and_goes_on(colour_folder, tmp_path):
    config = _config("all:2:auto", lr_candidates=CANDIDATES)
    results = finetune(colour_folder, TINY, config, tmp_path / "auto", workers=0, progress=False)
    sweep = results["lr_sweep"]
    assert sweep["selected_by"] == "val_loss"  # 6 val images
    assert sweep["candidates"] == list(CANDIDATES) and [r["lr"] for r in sweep["runs"]] == list(CANDIDATES)
    losses = {r["lr"]: r["val_loss"] for r in sweep["runs"]}
    assert losses[1e3] is None  # diverged: the worst there is
    assert sweep["chosen"] == 1e-1 == min((v, k) for k, v in losses.items() if v is not None)[1]
    assert sweep["at_edge"] is None  # 1e3 was tried above it (and diverged)
    assert results["finetune"]["lr_chosen"] == 1e-1
    assert results["finetune"]["phases"] == [{"freeze": "all", "epochs": 2, "lr": 1e-1, "lr_auto": 1.0}]
    chosen = next(r for r in sweep["runs"] if r["lr"] == 1e-1)
    assert results["curves"][1] == chosen["curve"][0]  # its epoch is the run's epoch 1
    assert [c["epoch"] for c in results["curves"]] == [0, 1, 2]
    others = sum(r["seconds"] for r in sweep["runs"] if r["lr"] != 1e-1)
    assert results["train"]["fit_seconds"] >= others

    # going on from the chosen candidate is exactly training at that rate from the start
    fixed = finetune(colour_folder, TINY, _config("all:2:1e-1"), tmp_path / "fixed", workers=0, progress=False)
    _assert_same_weights(_weights(tmp_path / "auto"), _weights(tmp_path / "fixed"))
    assert [c["val_loss"] for c in fixed["curves"]] == [c["val_loss"] for c in results["curves"]]
    meta = json.loads((tmp_path / "auto" / "finetune.json").read_text())
    assert meta["lr_chosen"] == 1e-1


def test_max_minutes_cuts_the_choice_and_says_so(colour_folder, tmp_path):
    config = _config("head:1:auto", lr_candidates=(1e-3, 1e-2, 1e-1), max_minutes=1e-6)
    results = finetune(colour_folder, TINY, config, tmp_path / "ft", workers=0, progress=False)
    sweep = results["lr_sweep"]
    assert [r["lr"] for r in sweep["runs"]] == [1e-2] and sweep["cut"] == [1e-3, 1e-1]
    assert sweep["chosen"] == 1e-2 and sweep["max_minutes"] == 1e-6
    assert sweep["at_edge"] is None  # one rate tried: no edge to speak of


def test_a_rate_chosen_at_the_edge_of_the_candidates_is_flagged():
    from featx.finetune.state import LrSweep
    from featx.finetune.sweep import at_edge

    def sweep(chosen, tried):
        return LrSweep(0, list(tried), "val_loss", runs=[{"lr": lr} for lr in tried], chosen=chosen)

    assert at_edge(sweep(1e-2, (3e-3, 1e-3, 1e-2))) == "upper"
    assert at_edge(sweep(1e-3, (3e-3, 1e-3, 1e-2))) == "lower"
    assert at_edge(sweep(3e-3, (3e-3, 1e-3, 1e-2))) is None


# checkpoint writes: 1 the head epoch, 2-4 the candidates, 5 the chosen epoch (the choice made), 6-7 the rest
@pytest.mark.parametrize("stop_at", [2, 4, 5])
def test_resume_mid_choice_gives_the_same_weights(colour_folder, tmp_path, monkeypatch, stop_at):
    from featx.finetune import epochs, sweep

    config = _config("head:1:1e-2,all:3:auto", lr_candidates=(1e-3, 1e-2, 1e-1))
    reference = finetune(colour_folder, TINY, config, tmp_path / "reference", workers=0, progress=False)
    writes = []

    def save_then_stop(save):
        def wrapped(path, state):
            save(path, state)
            writes.append(path)
            if len(writes) == stop_at:
                raise KeyboardInterrupt

        return wrapped

    monkeypatch.setattr(sweep, "save_checkpoint", save_then_stop(sweep.save_checkpoint))
    monkeypatch.setattr(epochs, "save_checkpoint", save_then_stop(epochs.save_checkpoint))
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        finetune(colour_folder, TINY, config, out, workers=0, progress=False)
    monkeypatch.undo()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["lr_sweep"]
    assert len(saved["runs"]) == min(stop_at - 1, 3) and (saved["chosen"] is None) is (stop_at < 5)

    resumed = finetune(colour_folder, TINY, config, out, workers=0, progress=False)
    _assert_same_weights(_weights(out), _weights(tmp_path / "reference"))
    assert resumed["lr_sweep"]["chosen"] == reference["lr_sweep"]["chosen"]
    assert [c["val_loss"] for c in resumed["curves"]] == [c["val_loss"] for c in reference["curves"]]
    assert [(r["lr"], r["val_loss"]) for r in resumed["lr_sweep"]["runs"]] == [
        (r["lr"], r["val_loss"]) for r in reference["lr_sweep"]["runs"]
    ]


def test_cli_lr_auto(colour_folder, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", str(colour_folder), "--backbone", TINY, "--phases", "head:1:1e-2,all:1:1e-3"]
    options = ["--lr", "auto", "--lr-candidates", "1e-2,1e-1", "--batch-size", "8", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(main, [*args, *options, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "learning rate chosen by val_loss" in result.output
    assert "(the highest candidate" in result.output or "(the lowest candidate" in result.output  # either is an edge
    results = json.loads((out / "results.json").read_text())
    chosen = results["lr_sweep"]["chosen"]
    assert [p["lr"] for p in results["finetune"]["phases"]] == pytest.approx([chosen, chosen / 10])
    assert load_file(str(out / "model.safetensors"))
    bad = CliRunner().invoke(main, [*args, "--lr-candidates", "1e-2,x", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "lr_candidates must be a list of distinct items, each a number greater" in bad.output


# --------------------------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_mid_choice_then_resume_gives_the_same_weights(colour_folder, tmp_path):
    args = ["finetune", str(colour_folder), "--backbone", TINY, "--phases", "head:1:1e-2,all:2:auto"]
    args += ["--lr-candidates", "1e-3,1e-2,1e-1", "--batch-size", "8", "--workers", "0", "--no-progress"]
    out = tmp_path / "killed"
    proc = start_slow_finetune(tmp_path, args, out, step_seconds=0.1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until a candidate is tried and the choice is not made
        try:
            sweep = torch.load(out / "checkpoint.pt", weights_only=True).get("lr_sweep")
            if sweep and sweep["runs"]:
                break
        except Exception:  # no checkpoint yet, or caught mid-rename
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    sweep = torch.load(out / "checkpoint.pt", weights_only=True)["lr_sweep"]
    assert sweep["chosen"] is None and 1 <= len(sweep["runs"]) < 3

    runner = CliRunner()
    resumed = runner.invoke(main, [*args, "--out", str(out)], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    reference = runner.invoke(main, [*args, "--out", str(tmp_path / "reference")], catch_exceptions=False)
    assert reference.exit_code == 0
    _assert_same_weights(_weights(out), _weights(tmp_path / "reference"))
    ra = json.loads((out / "results.json").read_text())
    rb = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert ra["lr_sweep"]["chosen"] == rb["lr_sweep"]["chosen"]
    assert [c["val_loss"] for c in ra["curves"]] == [c["val_loss"] for c in rb["curves"]]
