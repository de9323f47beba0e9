"""Fine-tuning: phases, freezing, frozen BatchNorm statistics, schedules, LP-FT, crash-safe resume, CLI."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_image, start_slow_finetune, wait_for_checkpoint
from safetensors.torch import load_file

import featx.backbones as B
from featx.cli import main
from featx.exceptions import SpecMismatchError, UnknownNameError
from featx.finetune import FinetuneConfig, Phase, block_names, finetune, head_from_logreg, parse_phases
from featx.finetune.heads import set_train_mode, set_trainable
from featx.finetune.state import RunState
from featx.spec import Preprocessing


@pytest.fixture
def folder(colour_folder) -> Path:
    return colour_folder


def _config(phases="head:1:1e-2", **kw) -> FinetuneConfig:
    return FinetuneConfig(phases=tuple(parse_phases(phases)), batch_size=8, **kw)


# -------------------------------------------------------------------------------------------- phases
def test_parse_phases_strings_and_toml(tmp_path):
    assert parse_phases("head:3:1e-3,top2:5:1e-4,all:5:1e-5") == [
        Phase("head", 3, 1e-3),
        Phase("top2", 5, 1e-4),
        Phase("all", 5, 1e-5),
    ]
    (tmp_path / "p.toml").write_text('[[phase]]\nfreeze = "head"\nepochs = 2\nlr = 0.01\n')
    assert parse_phases(tmp_path / "p.toml") == [Phase("head", 2, 0.01)]
    for bad, message in [
        ("head:3", "FREEZE:EPOCHS:LR"),
        ("top0:1:1e-3", "use head, topK"),
        ("some:1:1e-3", "FREEZE:EPOCHS:LR"),
        ("head:0:1e-3", "at least one epoch"),
        ("head:1:0", "positive learning rate"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_phases(bad)
    (tmp_path / "bad.toml").write_text('[[phase]]\nfreeze = "head"\nepochs = 2\n')
    with pytest.raises(ValueError, match="exactly freeze, epochs and lr"):
        parse_phases(tmp_path / "bad.toml")


def test_blocks_per_family():
    import torchvision

    tiny = B.load_backbone(TINY)
    blocks = block_names(tiny)
    assert len(blocks) >= 4 and blocks[0][0].startswith("conv_stem")
    assert not any(n.startswith("classifier") for b in blocks for n in b)
    pre = Preprocessing((64, 64), 72, "bilinear", (0.5,) * 3, (0.5,) * 3)
    resnet = B.Backbone("torchvision:resnet18", torchvision.models.resnet18(num_classes=3), pre, "w", "0")
    assert [b[0].split(".")[0] for b in block_names(resnet)] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    vgg = B.Backbone("torchvision:vgg11", torchvision.models.vgg11(num_classes=3), pre, "w", "0")
    vgg_blocks = [b[0] for b in block_names(vgg)]
    assert "classifier.0.weight" in vgg_blocks and "classifier.3.weight" in vgg_blocks  # fc6, fc7 are blocks
    assert not any(n.startswith("classifier.6") for b in block_names(vgg) for n in b)


def test_phase_freezing_and_frozen_batchnorm():
    net = B.load_backbone(TINY)
    blocks = block_names(net)
    head = net.classifier_name()
    model = net.model
    trainable = set_trainable(model, blocks, head, Phase("head", 1, 1e-3))
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    trainable = set_trainable(model, blocks, head, Phase("top2", 1, 1e-3))
    assert trainable == {*blocks[-1], *blocks[-2], f"{head}.weight", f"{head}.bias"}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    set_train_mode(model, update_bn_stats=True)
    for name, bn in bns.items():
        frozen = not any(p.requires_grad for p in bn.parameters())
        assert bn.training is not frozen, name
    set_train_mode(model)  # the default: no BatchNorm statistics move, trainable or not
    assert not any(bn.training for bn in bns.values())
    assert model.training
    with pytest.raises(UnknownNameError, match=f"only {len(blocks)} blocks"):
        set_trainable(model, blocks, head, Phase(f"top{len(blocks) + 1}", 1, 1e-3))


def test_frozen_parameters_and_bn_statistics_do_not_move(folder, tmp_path):
    before = {k: v.clone() for k, v in B.load_backbone(TINY).model.state_dict().items()}
    finetune(folder, TINY, _config("top1:2:5e-2"), tmp_path / "ft", workers=0, progress=False)
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    blocks = block_names(B.load_backbone(TINY))
    last = set(blocks[-1])
    last_modules = {n.rsplit(".", 1)[0] for n in last}
    moved = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert moved, "the last block must train"
    for key in moved:  # only the last block (params and its BN statistics) and the head change
        assert key.rsplit(".", 1)[0] in last_modules or key.startswith("classifier"), key
    frozen_stats = [k for k in before if k.endswith("running_mean") and k.rsplit(".", 1)[0] not in last_modules]
    assert frozen_stats and all(torch.equal(before[k], after[k]) for k in frozen_stats)


def test_a_finetune_leaves_the_global_rng_as_it_found_it(folder, tmp_path):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    finetune(folder, TINY, _config("head:1:1e-2"), tmp_path / "ft", workers=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # a caller's own random draws are not reseeded


def test_phase_transitions_change_rates_and_curves(folder, tmp_path):
    results = finetune(
        folder,
        TINY,
        _config("head:1:1e-2,top2:1:1e-3,all:1:1e-4", backbone_lr_mult=0.1, warmup=0.0),
        tmp_path / "ft",
        workers=0,
        progress=False,
    )
    start, *curves = results["curves"]
    assert (start["epoch"], start["freeze"], start["train_loss"]) == (0, "start", None)
    assert [c["freeze"] for c in curves] == ["head", "top2", "all"]
    assert curves[0]["lr_backbone"] is None
    for c, peak in zip(curves[1:], (1e-3, 1e-4), strict=True):
        assert c["lr_head"] <= peak and c["lr_backbone"] == pytest.approx(0.1 * c["lr_head"])
    assert all(c["images_per_second"] > 0 for c in curves)
    assert results["test"]["n"] == 6 and set(results["test"]) >= {"accuracy", "accuracy_ci95", "macro_f1"}
    assert results["kind"] == "finetune" and results["method"].startswith("finetune[head→top2→all]")
    assert "carved from train" in results["val_policy"]


def test_epoch_0_wins_when_training_only_hurts(folder, tmp_path):
    """A rate that destroys the network: no epoch beats the start on val, so the start is what is kept."""
    from featx.backbones.names import resolve_backbone
    from featx.finetune.prepare import build_model, load_manifest

    config = _config("head:1:1e3,all:1:1e3", metric="val_loss")
    results = finetune(folder, TINY, config, tmp_path / "ft", workers=0, progress=False)
    start, *trained = results["curves"]
    assert start["epoch"] == 0 and [c["epoch"] for c in trained] == [1, 2]
    assert all(c["val_loss"] is None or c["val_loss"] > start["val_loss"] for c in trained)  # worse, or diverged
    assert results["best_epoch"] == 0
    built = build_model(resolve_backbone(TINY), load_manifest(folder, None), config, init_head=None, trust=False)
    saved = load_file(str(tmp_path / "ft" / "model.safetensors"))
    before = built.net.model.state_dict()
    assert saved.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(saved[key], value), key
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["best_epoch"] == 0


@pytest.mark.parametrize("flip", [True, False])
def test_no_flip_never_mirrors_a_training_image(tmp_path, flip):
    """An image dark on the left, bright on the right, cropped whole: only a flip can swap the halves."""
    from PIL import Image

    from featx.finetune.data import TrainImages

    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, 16:] = 255
    Image.fromarray(arr).save(tmp_path / "half.png")
    pre = Preprocessing((16, 16), 16, "bilinear", (0.5,) * 3, (0.5,) * 3)
    images = TrainImages([str(tmp_path / "half.png")], np.array([0]), pre, (1.0, 1.0), 10**8, flip=flip)
    mirrored = []
    for epoch_seed in range(40):
        pixels, _, _ = images[(0, epoch_seed, 1.0)]
        left, right = pixels[:, :, :8].float().mean(), pixels[:, :, 8:].float().mean()
        mirrored.append(bool(left > right))
    assert any(mirrored) is flip  # with flips some draws are mirrored; without, none is
    assert FinetuneConfig(phases=(Phase("head", 1, 1e-3),), flip=False).to_dict()["flip"] is False
    with pytest.raises(ValueError, match="flip must be true or false"):
        FinetuneConfig(phases=(Phase("head", 1, 1e-3),), flip="no")


def test_run_hash_of_settings_featx_had_before_is_unchanged():
    """Settings added later, at the value that trains as before, leave the run hash as an older featx wrote it
    (the hash below is featx 3fc3475's), so a run it left killed resumes; another value is another run."""
    from types import SimpleNamespace

    from featx.finetune.artifacts import config_hash

    net = SimpleNamespace(name="featx:tiny_test", weights_sha256="w" * 64)
    config = _config("head:1:1e-2,all:2:1e-3", layer_decay=1.0)  # the one rate for every block featx had then
    assert config_hash(config, net, "m", None) == "611a8df21fdac049ed58bad4c21b417495b5f7be4897855f7124e85d5d06103c"
    for other in ({"flip": False}, {}):  # no flip; today's default layer decay (0.5)
        assert config_hash(_config("head:1:1e-2,all:2:1e-3", **other), net, "m", None) != config_hash(
            config, net, "m", None
        )


def test_the_probe_floor_is_in_an_lp_ft_runs_hash_only():
    """A plain fine-tune's hash ignores the LP-FT floor (its cached runs stay valid); an LP-FT's takes it, and the
    exact fold (0) hashes as featx did before the floor existed."""
    from types import SimpleNamespace

    from featx.finetune.artifacts import config_hash

    net = SimpleNamespace(name="featx:tiny_test", weights_sha256="w" * 64)
    exact, floored = _config(probe_scale_floor=0.0), _config()
    assert "probe_scale_floor" not in floored.identity(lp_ft=False)
    assert floored.identity(lp_ft=True)["probe_scale_floor"] == 0.3
    assert "probe_scale_floor" not in exact.identity(lp_ft=True)
    assert config_hash(exact, net, "m", None) == config_hash(floored, net, "m", None)
    assert config_hash(exact, net, "m", "probe.skops") != config_hash(floored, net, "m", "probe.skops")


def test_cli_no_flip_reaches_the_run(folder, tmp_path, monkeypatch):
    from featx.finetune import data

    seen = []
    original = data.TrainImages.__init__

    def spy(self, *args, **kw):
        seen.append(kw.get("flip"))
        original(self, *args, **kw)

    monkeypatch.setattr(data.TrainImages, "__init__", spy)
    args = ["finetune", str(folder), "--backbone", TINY, "--phases", "head:1:1e-2", "--batch-size", "8"]
    out = tmp_path / "ft"
    result = CliRunner().invoke(main, [*args, "--workers", "0", "--no-progress", "--no-flip", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == [False] and "flip off" in result.output
    assert json.loads((out / "results.json").read_text())["finetune"]["flip"] is False


def test_schedule_warms_up_then_decays():
    from featx.finetune.epochs import _lr_lambda

    f = _lr_lambda(total_steps=100, warmup_steps=10)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[-1] < 0.01


def test_run_schedule_is_one_curve_over_the_phases():
    """schedule="run": each phase's stretch of one warm-up + cosine; "phase": each phase its own."""
    from featx.finetune.epochs import _lr_lambda, _schedule

    config = _config("head:2:1e-2,all:3:1e-3", schedule="run", warmup=0.2)
    whole = _lr_lambda(total_steps=50, warmup_steps=10)
    head, rest = _schedule(config, 0, 10), _schedule(config, 1, 10)
    assert [head(s) for s in range(20)] + [rest(s) for s in range(30)] == [whole(s) for s in range(50)]
    assert rest(0) < 1.0 and rest(29) < 0.01  # the second phase starts part-way down and ends near 0
    per_phase = _schedule(_config("head:2:1e-2,all:3:1e-3", warmup=0.2), 1, 10)
    assert per_phase(0) == pytest.approx(1 / 6) and per_phase(6) == pytest.approx(1.0)  # its own warm-up


def test_layer_decay_lowers_each_block_below_the_top():
    from featx.finetune.epochs import _optimizer

    net = B.load_backbone(TINY)
    blocks, head = block_names(net), net.classifier_name()
    assert len(blocks) >= 3
    for p in net.model.parameters():
        p.requires_grad_(True)
    rates = {}
    optimizer = _optimizer(net.model, head, blocks, _config(layer_decay=0.5, backbone_lr_mult=0.1), lr=1.0)
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = (group["lr"], group["featx_group"])
    named = dict(net.model.named_parameters())
    for i, block in enumerate(blocks):
        depth = len(blocks) - 1 - i
        for name in block:
            assert rates[id(named[name])] == (
                pytest.approx(0.1 * 0.5**depth),
                "backbone" if depth == 0 else f"backbone-{depth}",
            )
    assert {rates[id(p)] for n, p in named.items() if n.startswith(head + ".")} == {(1.0, "head")}
    # Without decay the groups are the ones featx always made: a checkpoint's optimiser state still loads.
    plain = _optimizer(net.model, head, blocks, _config(backbone_lr_mult=0.1, layer_decay=1.0), lr=1.0)
    assert sorted((g["featx_group"], g["lr"], g["weight_decay"]) for g in plain.param_groups) == sorted(
        [("backbone", 0.1, 0.0), ("backbone", 0.1, 1e-4), ("head", 1.0, 0.0), ("head", 1.0, 1e-4)]
    )


def test_layer_decay_and_run_schedule_train_and_are_recorded(folder, tmp_path):
    results = finetune(
        folder,
        TINY,
        _config("head:1:1e-2,all:2:1e-3", layer_decay=0.5, schedule="run", warmup=0.0),
        tmp_path / "ft",
        workers=0,
        progress=False,
    )
    assert (results["finetune"]["layer_decay"], results["finetune"]["schedule"]) == (0.5, "run")
    all_epochs = results["curves"][2:]  # after epoch 0 and the head's
    assert all(c["lr_backbone"] == pytest.approx(c["lr_head"]) for c in all_epochs)  # the top block: no decay
    assert all_epochs[0]["lr_head"] < 1e-3  # the run's cosine has come down before phase 2 starts
    for bad, message in [
        ({"layer_decay": 0.0}, r"layer_decay must be a number in \(0, 1\]; got 0.0"),
        ({"layer_decay": 1.5}, r"layer_decay must be a number in \(0, 1\]; got 1.5"),
        ({"schedule": "epoch"}, "unknown schedule 'epoch'. Choose one of phase, run"),
    ]:
        with pytest.raises(ValueError, match=message):
            _config(**bad)
    cli = CliRunner().invoke(main, ["finetune", str(folder), "--layer-decay", "2", "--out", str(tmp_path / "x")])
    assert cli.exit_code != 0 and "--layer-decay" in cli.output


def test_errors_before_training(folder, tmp_path):
    one = tmp_path / "one"
    make_image(one / "only" / "a.png", seed=1)
    make_image(one / "only" / "b.png", seed=2)
    with pytest.raises(ValueError, match="fewer than two classes"):
        finetune(one, TINY, _config(), tmp_path / "x", workers=0, progress=False)
    with pytest.raises(UnknownNameError, match="blocks, so use top1"):
        finetune(folder, TINY, _config("top99:1:1e-3"), tmp_path / "x", workers=0, progress=False)
    finetune(folder, TINY, _config(), tmp_path / "ft", workers=0, progress=False)
    with pytest.raises(SpecMismatchError, match="--overwrite"):
        finetune(folder, TINY, _config("head:2:1e-2"), tmp_path / "ft", workers=0, progress=False)
    finetune(folder, TINY, _config("head:2:1e-2"), tmp_path / "ft", workers=0, progress=False, overwrite=True)


# ---------------------------------------------------------------------------------------------- LP-FT
@pytest.mark.parametrize("preprocess", [(), ("standard",)])
def test_lp_ft_head_is_exactly_the_logistic_regression(folder, tmp_path, preprocess):
    from featx.classify import ClassifierConfig, train
    from featx.extract import extract

    store = extract(folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    model, _ = train(
        store, ClassifierConfig(classifier="logreg", value=1.0, preprocess=preprocess), out_dir=tmp_path / "lr"
    )
    net = B.load_backbone(TINY)
    W, b = head_from_logreg(tmp_path / "lr" / "model.skops", net, model.class_names)
    clf = model.pipeline.steps[-1][1]
    if not preprocess:
        np.testing.assert_array_equal(W.numpy(), clf.coef_.astype(np.float32))
        np.testing.assert_array_equal(b.numpy(), clf.intercept_.astype(np.float32))
    import featx.store

    with featx.store.open(store) as s:
        X = s.features()
    np.testing.assert_allclose(X @ W.numpy().T + b.numpy(), model.pipeline.decision_function(X), rtol=1e-4, atol=1e-4)

    # finetune starts from it: with a vanishing learning rate the saved head is that regression.
    results = finetune(
        folder,
        TINY,
        _config("head:1:1e-12", weight_decay=0.0, probe_scale_floor=0.0),
        tmp_path / "ft",
        init_head=tmp_path / "lr" / "model.skops",
        workers=0,
        progress=False,
    )
    saved = load_file(str(tmp_path / "ft" / "model.safetensors"))
    torch.testing.assert_close(saved["classifier.weight"], W, rtol=0, atol=1e-6)
    assert results["method"].startswith("lp-ft[head]")


def test_lp_ft_floor_caps_the_weights_of_near_dead_features(folder, tmp_path):
    """A feature whose std is a millionth of the median's gets a weight of a million from an exact fold; the floor
    caps it at coef / (floor x median) and leaves every feature above the floor exactly as folded."""
    from featx.classify import ClassifierConfig, train
    from featx.classify.model import load_model
    from featx.extract import extract

    store = extract(folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    train(store, ClassifierConfig(classifier="logreg", value=1.0), out_dir=tmp_path / "lr")
    model = load_model(tmp_path / "lr" / "model.skops")
    scaler, clf = model.pipeline.steps[0][1], model.pipeline.steps[-1][1]
    scaler.scale_ = scaler.scale_.copy()
    scaler.scale_[0] = 1e-6 * np.median(scaler.scale_)  # a channel the backbone almost never activates
    median = np.median(scaler.scale_)
    model.save(tmp_path / "dead" / "model.skops")
    net, names = B.load_backbone(TINY), list(model.class_names)
    exact, _ = head_from_logreg(tmp_path / "dead" / "model.skops", net, names)
    floored, floored_bias = head_from_logreg(tmp_path / "dead" / "model.skops", net, names, scale_floor=0.3)
    coef = clf.coef_.astype(np.float32)
    np.testing.assert_allclose(exact[:, 0].numpy(), coef[:, 0] / scaler.scale_[0], rtol=1e-5)
    np.testing.assert_allclose(floored[:, 0].numpy(), coef[:, 0] / (0.3 * median), rtol=1e-5)
    above = scaler.scale_ >= 0.3 * median
    np.testing.assert_array_equal(floored[:, above].numpy(), exact[:, above].numpy())
    assert above.sum() > len(above) // 2
    # Weights and bias together: the floored head is the regression with its scaler's scales floored.
    import featx.store

    with featx.store.open(store) as s:
        X = s.features()
    scaler.scale_ = np.maximum(scaler.scale_, 0.3 * median)
    np.testing.assert_allclose(
        X @ floored.numpy().T + floored_bias.numpy(), model.pipeline.decision_function(X), rtol=1e-4, atol=1e-4
    )
    # The run folds with its config's floor: at a vanishing rate its saved head is the floored one.
    finetune(
        folder,
        TINY,
        _config("head:1:1e-12", weight_decay=0.0),
        tmp_path / "ft",
        init_head=tmp_path / "dead" / "model.skops",
        workers=0,
        progress=False,
    )
    saved = load_file(str(tmp_path / "ft" / "model.safetensors"))["classifier.weight"]
    torch.testing.assert_close(saved, floored, rtol=0, atol=1e-6)
    assert not torch.allclose(saved, exact)


def test_lp_ft_refuses_unfoldable_or_foreign_models(folder, tmp_path):
    from featx.classify import ClassifierConfig, train
    from featx.extract import extract

    store = extract(folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    train(store, ClassifierConfig(classifier="logreg", value=1.0, preprocess=("l2",)), out_dir=tmp_path / "l2")
    train(store, ClassifierConfig(classifier="svm", value=1.0), out_dir=tmp_path / "svm")
    net = B.load_backbone(TINY)
    names = ["blue", "green", "red"]
    with pytest.raises(ValueError, match="cannot be folded"):
        head_from_logreg(tmp_path / "l2" / "model.skops", net, names)
    with pytest.raises(ValueError, match="logistic regression"):
        head_from_logreg(tmp_path / "svm" / "model.skops", net, names)
    other = B.Backbone("featx:other", net.model, net.preprocessing, "w", "1" * 64)
    with pytest.raises(SpecMismatchError, match="train it on a store of this backbone"):
        head_from_logreg(tmp_path / "l2" / "model.skops", other, names)


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_after_kill_gives_the_same_weights(folder, tmp_path):
    args = [
        "finetune",
        str(folder),
        "--backbone",
        TINY,
        "--phases",
        "head:1:1e-2,all:3:1e-3",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--no-progress",
    ]
    out = tmp_path / "killed"
    proc = start_slow_finetune(tmp_path, args, out, step_seconds=0.05)
    wait_for_checkpoint(out, proc, epochs=2, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= len(state["curves"]) < 5  # epoch 0 and at least epoch 1, not all four

    runner = CliRunner()
    resumed = runner.invoke(main, [*args, "--out", str(out)], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    reference = runner.invoke(main, [*args, "--out", str(tmp_path / "reference")], catch_exceptions=False)
    assert reference.exit_code == 0
    # A finished run's checkpoint holds no weights: compare the kept ones (the curves pin every epoch).
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((out / "results.json").read_text())
    rb = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert [c["val_loss"] for c in ra["curves"]] == [c["val_loss"] for c in rb["curves"]]


#: The keys of checkpoint.pt as featx has written them since resuming exists (before RunState): the format.
_CHECKPOINT_KEYS = {
    "run_hash",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "curves",
    "best",
    "phase",
    "epoch_in_phase",
    "stale",
}


@pytest.mark.slow
def test_a_checkpoint_in_the_old_dict_layout_resumes_to_the_same_weights(folder, tmp_path, monkeypatch):
    """checkpoint.pt keeps the plain-dict layout featx wrote before the run state had a type: one written
    that way (a dict built key by key, saved with torch.save) resumes to an uninterrupted run's weights."""
    from featx.finetune import epochs

    config = _config("head:1:1e-2,all:2:1e-3")
    finetune(folder, TINY, config, tmp_path / "reference", workers=0, progress=False)

    save = epochs.save_checkpoint
    writes = []

    def save_then_stop(path, state):  # the run dies right after its second checkpoint (mid-phase "all")
        save(path, state)
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(epochs, "save_checkpoint", save_then_stop)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        finetune(folder, TINY, config, out, workers=0, progress=False)
    monkeypatch.undo()
    new = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(new) - {"seconds"} == _CHECKPOINT_KEYS  # today's writer keeps the format (adding the compute)
    assert (new["phase"], new["epoch_in_phase"], len(new["curves"])) == (1, 1, 3)  # epochs 0, 1, 2
    old = {  # exactly what the old writer built
        "run_hash": new["run_hash"],
        "model": new["model"],
        "optimizer": new["optimizer"],
        "scheduler": new["scheduler"],
        "scaler": new["scaler"],
        "curves": new["curves"],
        "best": {"metric": new["best"]["metric"], "epoch": new["best"]["epoch"]},
        "phase": 1,
        "epoch_in_phase": 1,
        "stale": new["stale"],
    }
    torch.save(old, out / "checkpoint.pt")

    resumed = finetune(folder, TINY, config, out, workers=0, progress=False)
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    # A finished run's checkpoint holds no weights: compare the kept ones (the curves pin every epoch).
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [c["val_loss"] for c in resumed["curves"]] == [c["val_loss"] for c in reference["curves"]]
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert {**resumed["test"], "predict_seconds": 0} == {**reference["test"], "predict_seconds": 0}
    with pytest.raises(ValueError, match="lacks best"):  # a dict that is not a featx checkpoint is named as such
        RunState.from_checkpoint({k: v for k, v in old.items() if k != "best"})


@pytest.mark.slow  # ~10 s: two short fine-tunes
def test_a_finished_run_keeps_a_checkpoint_without_weights_that_still_guards_the_folder(
    folder, tmp_path, monkeypatch, caplog
):
    from featx.finetune import epochs

    config = FinetuneConfig(phases=tuple(parse_phases("head:1:1e-2")), batch_size=8)
    out = tmp_path / "ft"
    with caplog.at_level("INFO", logger="featx.progress"):  # not a terminal: progress comes as log lines
        first = finetune(folder, TINY, config, out, workers=0, progress=True)
    progress = [r.getMessage() for r in caplog.records if r.name == "featx.progress"]
    assert any(m.startswith("epoch 1: ") and " batch (100 %)" in m for m in progress), progress  # per batch
    assert any(m.startswith("finetune: 1/1 epoch (100 %)") for m in progress), progress
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["model"] is None and saved["optimizer"] is None and saved["phase"] == 1
    assert (out / "checkpoint.pt").stat().st_size < 20_000  # the run's record, not the network

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(epochs, "train_epoch", no_training)
    again = finetune(folder, TINY, config, out, workers=0, progress=False)
    assert again["best_epoch"] == first["best_epoch"] and again["test"]["accuracy"] == first["test"]["accuracy"]
    other = FinetuneConfig(phases=tuple(parse_phases("head:2:1e-2")), batch_size=8)
    with pytest.raises(SpecMismatchError, match="other settings"):
        finetune(folder, TINY, other, out, workers=0, progress=False)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_finetune_predict_and_extract_from_the_finetuned_network(folder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ft"
    result = runner.invoke(
        main,
        [
            "finetune",
            str(folder),
            "--backbone",
            TINY,
            "--phases",
            "head:2:5e-2,all:1:1e-2",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output and "accuracy" in result.output
    assert f"featx extract SOURCE --backbone {out}" in result.output  # the folder, not a jq-extracted path
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["class_names"] == ["blue", "green", "red"] and meta["extract_with"].startswith("file:timm:")

    image = folder / "red" / "3.png"
    predicted = runner.invoke(main, ["predict", str(image), "--model", str(out), "--json"])
    assert predicted.exit_code == 0, predicted.output
    line = json.loads(predicted.output.splitlines()[-1])
    assert line["class"] in meta["class_names"] and abs(sum(s for _, s in line["top_k"]) - 1) < 1e-4

    extracted = runner.invoke(
        main,
        [
            "extract",
            str(folder),
            "--backbone",
            str(out),  # the fine-tune's folder names its network
            "--workers",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "ft.h5"),
        ],
    )
    assert extracted.exit_code == 0, extracted.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--phases", "head:1"], "FREEZE:EPOCHS:LR"),
        (["--hidden", "a,b"], "hidden must be a list of items, each an integer of at least 1, e.g. 512,256"),
        (["--batch-size", "99999999999999999999"], "batch_size must be an integer in [1, 2147483647]"),
        (["--crop-scale", "0.9,0.2"], "crop_scale must be MIN,MAX with MIN <= MAX"),
        (["--lr-candidates", "1e-3"], "lr_candidates must be two or more rates"),
        (["--optimizer", "lion"], "lion"),
    ],
)
def test_cli_finetune_validates_options(folder, tmp_path, args, message):
    result = CliRunner().invoke(
        main, ["finetune", str(folder), "--backbone", TINY, *args, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and message in result.output  # a malformed option is a usage error
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_hymenoptera_finetune_on_cpu(tmp_path):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "hymenoptera").is_dir():
        pytest.skip("../shared/data/hymenoptera not present")
    config = FinetuneConfig(phases=tuple(parse_phases("head:1:1e-2,top1:1:1e-3")), batch_size=32)
    results = finetune(SHARED_DATA / "hymenoptera", "featx:efficientnet_lite0", config, tmp_path / "ft", progress=False)
    assert results["test"]["n"] == 153 and results["test"]["accuracy"] > 0.85
