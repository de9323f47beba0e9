"""Backbones: names, weights (real, cached, from checkpoints), preprocessing, layers and pooling.

Nothing here touches the network: downloads are exercised against caches seeded in the temporary
folders that ``conftest.isolated_caches`` points TORCH_HOME / HF_HUB_CACHE at.
"""

from __future__ import annotations

import math
import os
import urllib.error
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from featx import backbones as B
from featx.backbones import features, folding, loading, names
from featx.data.imageio import preprocess_uint8
from featx.exceptions import UnknownNameError
from featx.spec import Preprocessing

TINY = "featx:tiny_test"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_REPO = "timm/test_resnet.r160_in1k"


# ------------------------------------------------------------------------------------------ helpers
def _random_model(build, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
    # BatchNorm layers are the identity at init; random ones make a mix-up (or a wrong fold) show.
    return _random_affine_batchnorms(model, seed)


def _random_affine_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running statistics and affine parameters: folding identity batch norms would prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.rand(module.num_features, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=gen) - 0.5)
    return model.eval()


def _resnet18(num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    import torchvision

    return _random_model(lambda: torchvision.models.resnet18(num_classes=num_classes), seed)


def _timm_test_resnet(num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    import timm

    return _random_model(lambda: timm.create_model("test_resnet", num_classes=num_classes), seed)


def _assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, tensor in state.items():
        assert torch.equal(own[key], tensor), key


def _normalise(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """featx's own preprocessing path: uint8 resize + centre crop, then the weights' mean/std."""
    x = preprocess_uint8(img, pre).float() / 255.0
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def _random_input(pre: Preprocessing, n: int = 2, seed: int = 0, max_side: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h, w = (min(side, max_side or side) for side in pre.input_size)
    return torch.randn(n, 3, h, w, generator=gen)


def _penultimate_matches_logits(net: B.Backbone, classifier: torch.nn.Module) -> None:
    # These networks pool globally, so a small input proves the point as well as a full-size one.
    x = _random_input(net.preprocessing, max_side=96)
    with torch.no_grad():
        logits = net.model(x)
        pen = net.feature_model(["penultimate"], "avg")(x)["penultimate"]
        assert pen.ndim == 2 and pen.shape[0] == 2
        torch.testing.assert_close(classifier(pen), logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A user's own torchvision resnet18 with 5 classes, saved as a plain state dict (.pt)."""
    state = _resnet18(num_classes=5, seed=1).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_5.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture
def tiny() -> B.Backbone:
    return B.load_backbone(TINY)


@pytest.fixture
def hf_cache(monkeypatch) -> Path:
    """This test's Hugging Face hub cache, offline.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is first imported, which may
    be before conftest's per-test environment exists; point its constants at this test's values.
    """
    from huggingface_hub import constants

    cache = Path(os.environ["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _seed_hf_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay out ``repo`` in the hub cache exactly as a download would: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot


@pytest.fixture
def no_download(monkeypatch) -> list[str]:
    """torch.hub downloads fail as they would offline (and never reach the network); the URLs are logged."""
    attempts: list[str] = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return attempts


# -------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchvision:resnet50.IMAGENET1K_V2", B.BackboneName("torchvision", "resnet50", "IMAGENET1K_V2")),
        ("torchvision:resnet50", B.BackboneName("torchvision", "resnet50", None)),
        ("timm:convnext_tiny.fb_in1k", B.BackboneName("timm", "convnext_tiny", "fb_in1k")),
        ("featx:efficientnet_lite0", B.BackboneName("featx", "efficientnet_lite0", None)),
        ("file:timm:convnext_tiny=/m/a=b.pth", B.BackboneName("file", "timm:convnext_tiny", None, "/m/a=b.pth")),
    ],
)
def test_parse_backbone_name(name, expected):
    assert B.parse_backbone_name(name) == expected


def test_resolve_fills_in_default_tags():
    assert str(B.resolve_backbone("torchvision:resnet50")) == "torchvision:resnet50.IMAGENET1K_V2"
    assert str(B.resolve_backbone("torchvision:resnet18.IMAGENET1K_V1")) == "torchvision:resnet18.IMAGENET1K_V1"
    assert str(B.resolve_backbone("timm:test_resnet")) == "timm:test_resnet.r160_in1k"
    assert str(B.resolve_backbone("featx:efficientnet_lite0")) == "featx:efficientnet_lite0"
    # Canonical names resolve to themselves.
    for name in ("torchvision:resnet50.IMAGENET1K_V2", "timm:test_resnet.r160_in1k"):
        assert str(B.resolve_backbone(name)) == name


def test_a_resolved_name_is_resolved_once_and_its_fields_say_what_it_is(tmp_path):
    resolved = B.resolve_backbone("torchvision:resnet50")
    assert resolved.resolved and not B.parse_backbone_name("torchvision:resnet50").resolved
    assert B.resolve_backbone(resolved) is resolved  # nothing checked twice
    assert resolved == B.BackboneName("torchvision", "resnet50", "IMAGENET1K_V2")  # `resolved` is not compared
    assert (resolved.family, resolved.model) == ("torchvision", "resnet50")
    parsed = B.parse_backbone_name("torchvision:resnet50")
    assert str(B.resolve_backbone(parsed)) == str(resolved)  # a parsed name is resolved from its fields
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    bare = B.parse_backbone_name(f"file:resnet18={ckpt}")
    assert (bare.family, bare.model) == ("", "resnet18")  # the zoo is known once resolved
    full = B.resolve_backbone(bare)
    assert (full.family, full.model, full.path) == ("torchvision", "resnet18", str(ckpt.resolve()))


def test_extract_parses_the_backbone_name_once(image_folder, tmp_path, monkeypatch):
    from featx.extract import extract

    calls = []
    parse = names.parse_backbone_name
    monkeypatch.setattr(names, "parse_backbone_name", lambda name: calls.append(name) or parse(name))
    result = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False)
    assert calls == [TINY]
    assert result.spec.backbone == TINY  # the spec keeps the canonical string: keys do not change
    net = B.load_backbone(B.resolve_backbone(TINY))
    assert net.parsed == B.BackboneName("featx", "tiny_test") and net.parsed.resolved and net.name == TINY


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchvision:resnet5", ["resnet50", "featx backbones"]),
        ("torchvision:resnet50.IMAGENET1K_V3", ["IMAGENET1K_V1", "IMAGENET1K_V2", "Its tags are"]),
        ("timm:test_resnett", ["test_resnet", "featx backbones"]),
        ("timm:test_resnet.r160_in1kk", ["r160_in1k"]),
        ("featx:efficientnet_lite", ["featx:efficientnet_lite0", "featx backbones"]),
        ("featx:efficientnet_lite0.imagenet", ["featx:efficientnet_lite0"]),
        ("tochvision:resnet50", ["torchvision", "featx backbones"]),
        ("resnet50", ["SOURCE:NAME", "featx backbones"]),
        ("file:resnet5=ckpt.pt", ["resnet50", "featx backbones"]),
    ],
)
def test_unknown_names_suggest_close_matches(name, expected):
    with pytest.raises(UnknownNameError) as info:
        B.resolve_backbone(name)
    assert isinstance(info.value, ValueError)
    for text in expected:
        assert text in str(info.value)


def test_unknown_name_raised_before_loading_or_reading(monkeypatch, tmp_path):
    from featx.extract import engine as extract_module
    from featx.extract import extract

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was read before the name was checked")

    monkeypatch.setattr(extract_module, "load_for_model", no_decoding)
    monkeypatch.setattr(loading, "_build_checkpoint", no_decoding)
    with pytest.raises(UnknownNameError, match="resnet50"):
        B.load_backbone("torchvision:resnet5")
    with pytest.raises(UnknownNameError, match="resnet50"):
        B.load_backbone(f"file:resnet5={tmp_path / 'x.pt'}")
    with pytest.raises(UnknownNameError, match="resnet50"):
        extract(tmp_path / "no-such-folder", "torchvision:resnet5", workers=0, progress=False)


def test_unknown_layer_raised_before_any_image(monkeypatch, image_folder, tmp_path):
    from featx.extract import engine as extract_module
    from featx.extract import extract

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was read before the layer was checked")

    monkeypatch.setattr(extract_module, "load_for_model", no_decoding)
    out = tmp_path / "store.h5"
    with pytest.raises(UnknownNameError, match="conv_head"):
        extract(image_folder, TINY, layers=["conv_haed"], out=out, workers=0, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ listing
def test_list_backbones_has_builtins_and_torchvision():
    rows = {row.name: row for row in B.list_backbones()}
    lite0 = rows["featx:efficientnet_lite0"]
    assert lite0.cached_tags == ("builtin",) and lite0.description
    assert "IMAGENET1K_V2" in rows["torchvision:resnet50"].tags
    assert "DEFAULT" not in rows["torchvision:resnet50"].tags
    assert "timm:test_resnet" in rows
    assert {r.name for r in B.list_backbones(source="featx")} >= {"featx:efficientnet_lite0", TINY}
    assert [r.name for r in B.list_backbones(source="torchvision", pattern="resnet1?")] == ["torchvision:resnet18"]
    with pytest.raises(UnknownNameError, match="torchvision"):
        B.list_backbones(source="torchvison")


def test_register_backbone_twice_is_an_error():
    from conftest import tiny_factory

    B.register_backbone("dup_test", tiny_factory, "tests")
    try:
        with pytest.raises(ValueError, match="already registered"):
            B.register_backbone("dup_test", tiny_factory, "tests")
        with pytest.raises(ValueError, match="already registered"):
            B.register_backbone("efficientnet_lite0", tiny_factory)
    finally:
        names._unregister_backbone("dup_test")
    with pytest.raises(ValueError, match="letters"):
        B.register_backbone("bad name", tiny_factory)
    assert "featx:dup_test" not in {r.name for r in B.list_backbones(source="featx")}


def test_cli_backbones_lists_builtin():
    from featx.cli import main

    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 0, result.output
    assert "featx:efficientnet_lite0" in result.output
    assert "torchvision:resnet50" in result.output


def test_cli_backbones_lists_layers():
    from featx.cli import main

    result = CliRunner().invoke(main, ["backbones", "--layers", TINY])
    assert result.exit_code == 0, result.output
    assert "penultimate = global_pool.flatten" in result.output
    assert "  conv_head" in result.output and "  blocks.1.0.conv_pwl" in result.output

    result = CliRunner().invoke(main, ["backbones", "--layers", "featx:tiny_tset"])
    assert result.exit_code == 1
    assert "featx:tiny_test" in result.output


def test_cli_backbones_lists_a_torchvision_networks_layers_without_its_weights(no_download):
    from featx.cli import main

    result = CliRunner().invoke(main, ["backbones", "--layers", "torchvision:resnet18"])
    assert result.exit_code == 0, result.output
    assert no_download == []
    assert "penultimate = flatten" in result.output and "  layer4" in result.output


def test_a_finetune_folder_is_a_backbone_name(tmp_path):
    import json
    import shutil

    folder = tmp_path / "ft"
    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "tiny" / "finetune", folder)
    (folder / "model.safetensors").write_bytes(b"weights")
    resolved = names.resolve_backbone(str(folder))
    assert (resolved.source, resolved.arch) == ("file", "timm:test_efficientnet")
    assert resolved.path == str((folder / "model.safetensors").resolve())  # the folder's, not the path recorded

    meta = json.loads((folder / "finetune.json").read_text())
    (folder / "finetune.json").write_text(json.dumps({**meta, "head": {**meta["head"], "hidden": [8]}}))
    with pytest.raises(ValueError, match="MLP head"):
        names.parse_backbone_name(str(folder))
    with pytest.raises(UnknownNameError, match=r"finetune\.json"):
        names.parse_backbone_name(str(tmp_path))


# ------------------------------------------------------------------------------ built-in, real weights
def test_efficientnet_lite0_has_real_imagenet_weights():
    """A cat photo must come out as a cat and a coffee photo as espresso/cup: ImageNet weights, aligned."""
    from skimage import data

    net = B.load_backbone("featx:efficientnet_lite0")
    assert net.name == "featx:efficientnet_lite0" and net.weights == "imagenet"
    assert not net.model.training
    pre = net.preprocessing
    assert pre == Preprocessing((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = {967, 968, 504}  # espresso, cup, coffee mug
    with torch.no_grad():
        cat_logits = net.model(_normalise(Image.fromarray(data.chelsea()), pre))
        coffee_logits = net.model(_normalise(Image.fromarray(data.coffee()), pre))
    assert cat_logits.shape == (1, 1000)
    assert int(cat_logits.argmax()) in cats
    assert int(coffee_logits.argmax()) in coffee
    # Confidently so: random or misaligned weights would not concentrate the mass there.
    assert float(cat_logits.softmax(1)[0, sorted(cats)].sum()) > 0.5
    assert float(coffee_logits.softmax(1)[0, sorted(coffee)].sum()) > 0.5
    _penultimate_matches_logits(net, net.model.classifier)
    assert features.feature_dims(net.feature_model(["penultimate"], "avg"), pre) == {"penultimate": 1280}


def test_lite0_preprocessing_matches_timm_config():
    import timm
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
    expected = Preprocessing.from_crop_pct(
        cfg["input_size"][1:], cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"]
    )
    assert expected == names._LITE0_PREPROCESSING


# ------------------------------------------------------------------------------- torchvision downloads
def _seed_torchvision(arch_weights, state) -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(arch_weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_torchvision_loads_from_seeded_cache(no_download):
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    assert B.list_backbones(source="torchvision", pattern="resnet18")[0].cached_tags == ()
    state = _resnet18(seed=3).state_dict()
    path = _seed_torchvision(weights, state)
    assert path.is_relative_to(Path(os.environ["TORCH_HOME"]))

    net = B.load_backbone("torchvision:resnet18")
    assert no_download == []
    assert net.name == "torchvision:resnet18.IMAGENET1K_V1" and net.weights == "IMAGENET1K_V1"
    _assert_same_weights(net.model, state)
    assert not net.model.training
    assert not any(p.requires_grad for p in net.model.parameters())
    assert net.weights_sha256 == loading.weights_checksum(_resnet18(seed=3))

    # Preprocessing is the weights' own transforms metadata.
    t = weights.transforms()
    pre = net.preprocessing
    assert pre == Preprocessing((224, 224), 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    assert (pre.resize_size, pre.input_size) == (t.resize_size[0], (t.crop_size[0], t.crop_size[0]))
    assert pre.interpolation == t.interpolation.value
    assert pre.mean == pytest.approx(tuple(t.mean)) and pre.std == pytest.approx(tuple(t.std))

    row = B.list_backbones(source="torchvision", pattern="resnet18")[0]
    assert row.cached_tags == ("IMAGENET1K_V1",)

    from featx.cli import main

    result = CliRunner().invoke(main, ["backbones", "--source", "torchvision", "--filter", "resnet18"])
    assert result.exit_code == 0 and "IMAGENET1K_V1*" in result.output


def test_torchvision_without_cache_or_network_says_how_to_fix(no_download):
    with pytest.raises(RuntimeError) as info:
        B.load_backbone("torchvision:resnet18")
    message = str(info.value)
    assert "network" in message and "Pre-seed" in message
    assert os.path.join("hub", "checkpoints", "resnet18-") in message
    assert "featx:efficientnet_lite0" in message and "file:" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert len(no_download) == 1 and no_download[0].endswith(".pth")


# --------------------------------------------------------------------------------------- timm downloads
def test_timm_loads_from_seeded_hf_cache(hf_cache):
    import timm
    from timm.data import resolve_data_config

    assert B.list_backbones(source="timm", pattern="test_resnet")[0].cached_tags == ()
    state = _timm_test_resnet(seed=4).state_dict()
    _seed_hf_cache(hf_cache, TIMM_REPO, state)

    net = B.load_backbone("timm:test_resnet.r160_in1k")
    assert net.name == "timm:test_resnet.r160_in1k" and net.weights == "r160_in1k"
    _assert_same_weights(net.model, state)
    assert B.load_backbone("timm:test_resnet").weights_sha256 == net.weights_sha256  # the default tag

    cfg = timm.models.get_pretrained_cfg("test_resnet.r160_in1k")
    assert resolve_data_config({}, model=net.model)["input_size"] == cfg.input_size
    pre = net.preprocessing
    assert pre.input_size == cfg.input_size[1:] == (160, 160)
    assert pre.resize_size == math.floor(160 / cfg.crop_pct) == 168
    assert pre.interpolation == cfg.interpolation == "bilinear"
    assert pre.mean == cfg.mean and pre.std == cfg.std

    assert B.list_backbones(source="timm", pattern="test_resnet")[0].cached_tags == ("r160_in1k",)
    _penultimate_matches_logits(net, net.model.get_classifier())


def test_timm_without_cache_or_network_says_how_to_fix(hf_cache):
    with pytest.raises(RuntimeError) as info:
        B.load_backbone("timm:test_resnet.r160_in1k")
    message = str(info.value)
    assert "network" in message and "Pre-seed" in message and TIMM_REPO in message
    assert str(hf_cache) in message


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_torchvision(resnet18_ckpt, tmp_path, suffix):
    from torchvision.models import ResNet18_Weights

    pt_path, state = resnet18_ckpt
    path = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        path.write_bytes(pt_path.read_bytes())

    net = B.load_backbone(f"file:resnet18={path}")
    assert net.name == f"file:torchvision:resnet18={path.resolve()}"
    assert net.weights == path.name
    assert net.model.fc.out_features == 5  # inferred from the checkpoint
    _assert_same_weights(net.model, state)
    assert net.preprocessing == loading._torchvision_preprocessing(ResNet18_Weights.DEFAULT)
    # The canonical name loads the same thing.
    assert B.load_backbone(net.name).weights_sha256 == net.weights_sha256
    _penultimate_matches_logits(net, net.model.fc)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_timm_arch(tmp_path, suffix):
    state = _timm_test_resnet(num_classes=5, seed=5).state_dict()
    path = tmp_path / f"timm_ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)

    net = B.load_backbone(f"file:timm:test_resnet={path}")
    assert net.name == f"file:timm:test_resnet={path.resolve()}"
    assert net.model.num_classes == 5 and net.model.get_classifier().out_features == 5
    _assert_same_weights(net.model, state)
    assert net.preprocessing.input_size == (160, 160) and net.preprocessing.resize_size == 168
    _penultimate_matches_logits(net, net.model.get_classifier())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_checkpoint_wrapped_and_ddp_prefixed(resnet18_ckpt, tmp_path, wrapper):
    _, state = resnet18_ckpt
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 7, "lr": 0.1}, path)
    net = B.load_backbone(f"file:resnet18={path}")
    assert net.model.fc.out_features == 5
    _assert_same_weights(net.model, state)


class _NotATensor:
    """A custom class: a weights_only load must refuse to import and construct it."""

    def __init__(self) -> None:
        self.value = 1


class _Payload:
    """Unpickling this would create a directory: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("kind", ["custom_class", "code"])
def test_checkpoint_with_pickled_objects_is_refused(resnet18_ckpt, tmp_path, kind):
    _, state = resnet18_ckpt
    marker = tmp_path / "pickled-code-ran"
    extra = _NotATensor() if kind == "custom_class" else _Payload(marker)
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": state, "extra": extra}, path)
    with pytest.raises(ValueError, match="cannot be read safely") as info:
        B.load_backbone(f"file:resnet18={path}")
    message = str(info.value)
    assert "weights_only" in message and "state_dict" in message and "safetensors" in message
    # One clear line, not torch's full essay (the temporary path's length varies from run to run).
    assert "\x1b[" not in message and len(message.replace(str(path), "PATH")) < 600
    assert not marker.exists()


def test_checkpoint_errors(resnet18_ckpt, tmp_path):
    pt_path, state = resnet18_ckpt

    wrong_suffix = tmp_path / "model.ckpt"
    wrong_suffix.write_bytes(pt_path.read_bytes())
    with pytest.raises(ValueError, match=r"suffix '\.ckpt'.*\.safetensors"):
        B.load_backbone(f"file:resnet18={wrong_suffix}")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        B.load_backbone(f"file:resnet18={tmp_path / 'missing.pt'}")

    with pytest.raises(UnknownNameError, match="file:ARCH=PATH"):
        B.load_backbone("file:resnet18")

    # Another architecture: fewer blocks (missing tensors) or other widths (shapes).
    with pytest.raises(ValueError, match=r"does not fit torchvision:resnet34.*missing"):
        B.load_backbone(f"file:resnet34={pt_path}")
    with pytest.raises(ValueError, match=r"does not fit timm:test_resnet.*other shapes"):
        B.load_backbone(f"file:timm:test_resnet={pt_path}")
    with pytest.raises(ValueError, match="does not fit torchvision:vit_b_16"):
        B.load_backbone(f"file:vit_b_16={pt_path}")

    not_a_state_dict = tmp_path / "list.pt"
    torch.save([state["fc.weight"]], not_a_state_dict)
    with pytest.raises(ValueError, match="holds no state dict"):
        B.load_backbone(f"file:resnet18={not_a_state_dict}")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        B.load_backbone(f"file:resnet18={corrupt}")


# ------------------------------------------------------------------------------------------- pooling
def test_pool_features_numerics():
    t = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, 0.0], [4.0, -3.0]]]], dtype=torch.float16)  # [1, 2, 2, 2]
    avg = features.pool_features(t, "avg")
    assert avg.dtype == torch.float32
    torch.testing.assert_close(avg, torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(features.pool_features(t, "max"), torch.tensor([[6.0, 4.0]]))
    torch.testing.assert_close(features.pool_features(t, "avgmax"), torch.tensor([[3.0, 0.0, 6.0, 4.0]]))
    # GeM (p = 3) over activations clamped at 1e-6: ((1 + 8 + 27 + 216) / 4) ** (1/3) and (64 / 4) ** (1/3).
    gem = features.pool_features(t, "gem")
    torch.testing.assert_close(gem, torch.tensor([[63.0 ** (1 / 3), 16.0 ** (1 / 3)]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        features.pool_features(t.abs() + 1, "gem", gem_p=1.0), features.pool_features(t.abs() + 1, "avg")
    )
    none = features.pool_features(t, "none")
    torch.testing.assert_close(none, torch.tensor([[1.0, 2.0, 3.0, 6.0, -1.0, 0.0, 4.0, -3.0]]))
    # Channels-last memory does not change what "none" means.
    torch.testing.assert_close(features.pool_features(t.float().to(memory_format=torch.channels_last), "none"), none)

    tokens = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [5.0, 0.0]]])  # [N=1, T=3, C=2]
    torch.testing.assert_close(features.pool_features(tokens, "avg"), torch.tensor([[3.0, 2.0 / 3.0]]))
    torch.testing.assert_close(features.pool_features(tokens, "max"), torch.tensor([[5.0, 4.0]]))
    assert features.pool_features(tokens, "avgmax").shape == (1, 4)
    assert features.pool_features(tokens, "none").shape == (1, 6)

    vectors = torch.randn(3, 5)
    for pool in ("avg", "max", "avgmax", "gem", "none"):
        torch.testing.assert_close(features.pool_features(vectors, pool), vectors)
    for t_ in (t, vectors):
        with pytest.raises(UnknownNameError, match="avgmax"):
            features.pool_features(t_, "avgmx")


# -------------------------------------------------------------------------------------------- layers
def test_tiny_layers_and_penultimate(tiny):
    nodes = tiny.layer_names()
    assert nodes[0] == "x" and "conv_head" in nodes and "classifier" in nodes
    assert tiny.penultimate_node() == "global_pool.flatten"
    tiny.check_layers(tiny.suggested_layers())  # every suggestion is a valid layer
    assert tiny.suggested_layers()[0] == "penultimate"
    _penultimate_matches_logits(tiny, tiny.model.classifier)


def test_unknown_layer_suggests_close_matches(tiny):
    with pytest.raises(UnknownNameError) as info:
        tiny.feature_model(["penultimate", "conv_haed"], "avg")
    message = str(info.value)
    assert "conv_head" in message and f"featx backbones --layers {TINY}" in message
    with pytest.raises(UnknownNameError, match=r"blocks\.1"):
        tiny.check_layers(["blokcs.1"])
    with pytest.raises(UnknownNameError, match="avgmax"):
        tiny.feature_model(["penultimate"], "avgmx")


def _module_outputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "gem", "none"])
def test_feature_model_several_layers_in_one_pass(tiny, pool):
    layers = ["blocks.1", "conv_head", "penultimate"]
    x = _random_input(tiny.preprocessing, n=3)
    raw = _module_outputs(tiny.model, ["blocks.1", "conv_head", "global_pool"], x)
    fm = tiny.feature_model(layers, pool)
    with torch.no_grad():
        out = fm(x)
    assert list(out) == layers
    for layer, t in out.items():
        assert t.dtype == torch.float32 and t.ndim == 2 and t.shape[0] == 3, layer
    # A module name means that module's output; pooling is pool_features on it.
    for layer in ("blocks.1", "conv_head"):
        torch.testing.assert_close(out[layer], features.pool_features(raw[layer], pool))
    # penultimate is already the pooled vector the classifier sees: pooling leaves it alone.
    torch.testing.assert_close(out["penultimate"], raw["global_pool"])
    c1, c2 = raw["blocks.1"].shape[1], raw["conv_head"].shape[1]
    expected = {
        "avg": (c1, c2),
        "max": (c1, c2),
        "gem": (c1, c2),
        "avgmax": (2 * c1, 2 * c2),
        "none": (raw["blocks.1"][0].numel(), raw["conv_head"][0].numel()),
    }[pool]
    assert (out["blocks.1"].shape[1], out["conv_head"].shape[1]) == expected
    assert out["penultimate"].shape[1] == c2 == 256
    dims = features.feature_dims(fm, tiny.preprocessing)
    assert dims == {layer: t.shape[1] for layer, t in out.items()}


def test_layers_naming_the_same_node(tiny):
    """penultimate and its node name, a module and its last node: each layer still gets its output."""
    x = _random_input(tiny.preprocessing)
    layers = ["penultimate", "global_pool.flatten", "global_pool", "bn2", "classifier"]
    with torch.no_grad():
        out = tiny.feature_model(layers, "avg")(x)
        logits = tiny.model(x)
    assert list(out) == layers
    torch.testing.assert_close(out["penultimate"], out["global_pool.flatten"])
    torch.testing.assert_close(out["penultimate"], out["global_pool"])
    torch.testing.assert_close(out["classifier"], logits)


def test_torchvision_module_layers(resnet18_ckpt):
    path, _ = resnet18_ckpt
    net = B.load_backbone(f"file:resnet18={path}")
    assert net.penultimate_node() == "flatten"
    net.check_layers(net.suggested_layers())
    x = _random_input(net.preprocessing, n=1, max_side=96)
    raw = _module_outputs(net.model, ["layer3", "layer4", "avgpool"], x)
    with torch.no_grad():
        out = net.feature_model(["layer3", "layer4", "penultimate"], "avgmax")(x)
    assert {k: v.shape[1] for k, v in out.items()} == {"layer3": 512, "layer4": 1024, "penultimate": 512}
    torch.testing.assert_close(out["layer4"], features.pool_features(raw["layer4"], "avgmax"))
    torch.testing.assert_close(out["penultimate"], raw["avgpool"].flatten(1))


# ------------------------------------------------------------------------------------------ checksum
def test_weights_checksum_changes_with_one_weight():
    model = _resnet18(num_classes=5, seed=2)
    first = loading.weights_checksum(model)
    assert first == loading.weights_checksum(_resnet18(num_classes=5, seed=2))  # deterministic
    assert len(first) == 64
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-3
    changed = loading.weights_checksum(model)
    assert changed != first
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] -= 1e-3
    # A buffer counts too.
    model.bn1.num_batches_tracked += 1
    assert loading.weights_checksum(model) not in (first, changed)


def test_builtin_checksum_is_stable(tiny):
    again = B.load_backbone(TINY)
    assert tiny.weights_sha256 == again.weights_sha256 == loading.weights_checksum(again.model)
    assert tiny.weights == "random-seed0"


def test_planted_pickle_in_the_torch_hub_cache_is_not_executed(no_download, tmp_path):
    from torchvision.models import ResNet18_Weights

    marker = tmp_path / "pickled-code-ran"
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="delete the file"):
        B.load_backbone("torchvision:resnet18")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is restored afterwards


class _NHWCNet(torch.nn.Module):
    """A toy network whose stage output is [N, H, W, C], like Swin's stages."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        stage = self.conv(x).permute(0, 2, 3, 1)
        return self.fc(stage.mean(dim=(1, 2)))


def test_channels_last_stage_outputs_are_pooled_over_space():
    pre = Preprocessing((32, 32), 32, "bilinear", (0.5,) * 3, (0.5,) * 3)
    net = B.Backbone("featx:nhwc", _NHWCNet().eval(), pre, "w", "0")
    fm = net.feature_model(["permute", "penultimate"], "avg")
    assert fm.channels_last == {"permute"}
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = fm(x)
        expected = net.model.conv(x).mean(dim=(2, 3))
    assert out["permute"].shape == (2, 6)
    torch.testing.assert_close(out["permute"], expected)
    torch.testing.assert_close(out["penultimate"], expected)


# ---------------------------------------------------------------------------------- batch norm folding
def _count_batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_folding_batchnorm_keeps_the_features_and_leaves_the_model_alone(tiny):
    _random_affine_batchnorms(tiny.model)
    layers = ["penultimate", "blocks.1", "bn2"]
    model = tiny.feature_model(layers, "avg")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    x = _random_input(tiny.preprocessing, n=3)
    with torch.no_grad():
        reference = model(x)
        folded = model.with_batchnorm_folded()
        out = folded(x)
    # Every batch norm of this EfficientNet follows a convolution (timm's BatchNormAct2d, activation kept).
    assert folded.folded_batchnorms == _count_batchnorms(tiny.model) > 0
    assert model.folded_batchnorms == 0
    graph = folded.extractor
    called = [graph.get_submodule(n.target) for n in graph.graph.nodes if n.op == "call_module"]
    assert not [m for m in called if _count_batchnorms(m)]  # no batch norm runs any more
    for layer in layers:
        torch.testing.assert_close(out[layer], reference[layer], rtol=1e-5, atol=1e-5)
    _assert_same_weights(tiny.model, before)
    with torch.no_grad():
        again = model(x)
    for layer in layers:
        assert torch.equal(again[layer], reference[layer])


def test_folding_torchvision_conv_norm_activation_blocks(tmp_path):
    import torchvision

    built = _random_model(lambda: torchvision.models.mobilenet_v3_small(num_classes=4))
    path = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in built.state_dict().items()}, path)
    net = B.load_backbone(f"file:mobilenet_v3_small={path}")
    model = net.feature_model(["penultimate"], "avg")
    x = _random_input(net.preprocessing, max_side=96)
    with torch.no_grad():
        folded = model.with_batchnorm_folded()
        torch.testing.assert_close(folded(x)["penultimate"], model(x)["penultimate"], rtol=1e-5, atol=1e-5)
    assert folded.folded_batchnorms == _count_batchnorms(net.model)


class _Unfoldable(torch.nn.Module):
    """One batch norm each that must stay: after a conv whose output is used twice, after a
    weight-standardised conv (which would undo the scaling), and in training mode; plus one foldable."""

    def __init__(self) -> None:
        from timm.layers import StdConv2d
        from torch import nn

        super().__init__()
        self.shared, self.bn_shared = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.std, self.bn_std = StdConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.shared(x)
        x = self.bn_shared(a) + a
        x = self.bn_std(self.std(x))
        return self.bn(self.conv(x))


def test_folding_only_where_it_is_exact():
    from timm.layers import StdConv2d
    from torch import fx

    class KeepStdConv(fx.Tracer):  # as timm's tracer does: its convolutions stay modules in the graph
        def is_leaf_module(self, module, name):
            return isinstance(module, StdConv2d) or super().is_leaf_module(module, name)

    net = _random_affine_batchnorms(_Unfoldable())
    graph = fx.GraphModule(net, KeepStdConv().trace(net))
    x = torch.randn(2, 3, 8, 8)
    folded, n = folding.fold_batchnorm(graph)
    assert n == 1
    assert {type(m).__name__ for m in folded.modules()} >= {"StdConv2d", "BatchNorm2d"}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), graph(x), rtol=1e-5, atol=1e-5)
    graph.train()
    assert folding.fold_batchnorm(graph)[1] == 0  # batch statistics, not running ones
    plain = _Unfoldable().eval()
    assert folding.fold_batchnorm(plain) == (plain, 0)  # not an FX graph: nothing to follow, nothing folded


def test_folding_leaves_hooked_and_weight_normed_convolutions_alone():
    from torch import fx, nn

    net = _random_affine_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    calls = []
    net[1].register_forward_hook(lambda *args: calls.append(1))  # a user's hook must keep firing
    folded, n = folding.fold_batchnorm(fx.symbolic_trace(net))
    assert n == 0
    with torch.no_grad():
        folded(torch.randn(1, 3, 8, 8))
    assert calls == [1]
    weight_norm = nn.utils.parametrizations.weight_norm
    normed = _random_affine_batchnorms(nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    assert folding.fold_batchnorm(fx.symbolic_trace(normed))[1] == 0
