"""Fine-tuning under torchrun: 2-process gloo runs on the CPU equal the single-process run, and resume.

Why not bitwise: a rank sums the gradient of its part of each batch, DDP then adds the ranks' sums, so the
float additions happen in another order than in one process (and convolutions over 4 images may take
another summation path than over 8). Those differences are ~1e-7 per step; after a few steps of SGD on the
tiny network the weights agree to well within the 1e-5 used below, and the accuracies exactly.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, rank_pids, torchrun, wait_for_checkpoint
from safetensors.torch import load_file

from featx.finetune import FinetuneConfig, finetune, parse_phases
from featx.finetune.data import GlobalBatches

TESTS = Path(__file__).resolve().parents[1]
PHASES = "head:1:0.5,top2:2:0.1"  # large rates: the weights move far in three epochs
ATOL = 1e-5

# A child process that knows the tiny test backbone; SLOW makes each optimiser step sleep (to kill it mid-run).
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import conftest  # registers featx:tiny_test
    if os.environ.get("FEATX_TEST_SLOW_STEP"):
        import torch
        original = torch.optim.SGD.step
        def slow_step(self, *a, **k):
            time.sleep(float(os.environ["FEATX_TEST_SLOW_STEP"]))
            return original(self, *a, **k)
        torch.optim.SGD.step = slow_step
    from featx.cli import main
    main(sys.argv[1:])
    """
)


def _args(folder: Path, out: Path) -> list[str]:
    return [
        "finetune",
        str(folder),
        "--backbone",
        TINY,
        "--phases",
        PHASES,
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--metric",
        "val_loss",
        "--no-progress",
        "--out",
        str(out),
    ]


def _single(folder: Path, out: Path) -> dict:
    config = FinetuneConfig(phases=tuple(parse_phases(PHASES)), batch_size=8, metric="val_loss")
    return finetune(folder, TINY, config, out, workers=0, progress=False)


def _assert_same_run(ddp_out: Path, single_out: Path) -> None:
    from conftest import tiny_factory

    initial = tiny_factory()[0].state_dict()
    # A finished run's checkpoint keeps only its record: the weights to compare are the chosen epoch's.
    best_a, best_b = (load_file(str(d / "model.safetensors")) for d in (ddp_out, single_out))
    assert best_a.keys() == best_b.keys()
    for key in best_a:
        torch.testing.assert_close(best_a[key], best_b[key], rtol=0, atol=ATOL, msg=key)
    moved = [k for k in initial if k.startswith("blocks") and k in best_b and not torch.equal(initial[k], best_b[k])]
    assert moved, "the top blocks must train, or the comparison proves nothing"
    ra = json.loads((ddp_out / "results.json").read_text())
    rb = json.loads((single_out / "results.json").read_text())
    assert ra["finetune"]["world_size"] == 2 and rb["finetune"]["world_size"] == 1
    assert ra["train"] == {**rb["train"], "fit_seconds": ra["train"]["fit_seconds"]}
    assert len(ra["curves"]) == len(rb["curves"]) == 4  # epoch 0 (before any update), then 3 epochs
    for ca, cb in zip(ra["curves"], rb["curves"], strict=True):
        assert ca["val_accuracy"] == cb["val_accuracy"] and ca["train_accuracy"] == cb["train_accuracy"]
        for key in ("train_loss", "val_loss", "lr_head", "lr_backbone"):
            assert ca[key] == pytest.approx(cb[key], abs=ATOL), key
    assert ra["best_epoch"] == rb["best_epoch"]
    for key in ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "confusion_matrix", "per_class"):
        assert ra["test"][key] == rb["test"][key], key
    meta_a, meta_b = (json.loads((d / "finetune.json").read_text()) for d in (ddp_out, single_out))
    assert {**meta_a, "extract_with": None} == {**meta_b, "extract_with": None}


def test_global_batches_shard_the_single_process_batches():
    """Every rank's parts, put side by side, are exactly the single-process batches; weights give the mean."""
    n, batch = 21, 8
    single = [[i for i, _, _ in b] for b in GlobalBatches(n, batch, epoch_seed=5)]
    assert sorted(i for b in single for i in b) == list(range(n)) and [len(b) for b in single] == [8, 8, 5]
    assert single != [[i for i, _, _ in b] for b in GlobalBatches(n, batch, epoch_seed=6)]  # seeded per epoch
    for world in (2, 3):
        ranks = [list(GlobalBatches(n, batch, 5, rank, world)) for rank in range(world)]
        assert len({len(r) for r in ranks}) == 1  # every rank takes every step
        for step, expected in enumerate(single):
            parts = [ranks[r][step] for r in range(world)]
            assert [i for p in parts for i, _, w in p if w > 0] == expected
            total = sum(w for p in parts for _, _, w in p)  # DDP divides by world: the weights average to 1/len
            assert total / world == pytest.approx(1.0)
    tiny = [list(GlobalBatches(1, batch, 0, rank, 2)) for rank in range(2)]
    assert tiny[0] == [[(0, 0, 2.0)]] and tiny[1] == [[(0, 0, 0.0)]]  # an empty part: one image, weight 0


def test_augmentation_depends_on_the_image_not_the_process(colour_folder):
    from featx.backbones import load_backbone
    from featx.finetune.data import TrainImages

    paths = sorted(str(p) for p in colour_folder.rglob("*.png"))[:3]
    images = TrainImages(paths, np.zeros(3, dtype=np.int64), load_backbone(TINY).preprocessing, (0.25, 1.0), 10**8)
    first = images[(2, 11, 0.5)][0]
    torch.manual_seed(123)  # the global generator's state does not matter
    assert torch.equal(images[(0, 11, 0.5)][0], images[(0, 11, 0.5)][0])
    assert torch.equal(images[(2, 11, 0.5)][0], first)
    assert not torch.equal(images[(2, 12, 0.5)][0], first)  # another epoch, another crop


@pytest.mark.slow
def test_two_process_gloo_finetune_killed_and_resumed_equals_single_process(colour_folder, tmp_path):
    """One torchrun run (2 ranks, gloo) killed in epoch 3, resumed by a second: the weights, curves and
    test metrics equal an uninterrupted single-process run's. (One test for both claims: each torchrun
    start costs several seconds on this CPU.)"""
    out = tmp_path / "killed"
    child = _CHILD.format(tests=str(TESTS))
    with torchrun(tmp_path, child, _args(colour_folder, out), FEATX_TEST_SLOW_STEP="0.3") as proc:
        # The curves hold epoch 0 (before any update), then one per epoch: 3 records = epoch 2 done, mid-phase.
        wait_for_checkpoint(out, proc, epochs=3, timeout=240)
        # As when the node dies: torchrun and both ranks (each in a session of its own) at once.
        ranks = rank_pids(tmp_path)
        assert len(ranks) == 2
        for pid in [proc.pid, *ranks]:
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["curves"]) == 3 and state["epoch_in_phase"] == 1  # resumes inside phase top2
    assert not (out / "results.json").exists()

    with torchrun(tmp_path, child, _args(colour_folder, out)) as resumed:
        stdout, stderr = resumed.communicate(timeout=300)
    text = stdout + stderr
    assert resumed.returncode == 0, text
    assert "resuming" in text and text.count("best epoch") == 1  # rank 0 tells the story, rank 1 stays quiet
    assert not list(out.glob(".*.tmp*"))  # no temporary file of an atomic write left behind
    _single(colour_folder, tmp_path / "single")
    _assert_same_run(out, tmp_path / "single")
