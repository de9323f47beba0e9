"""Shared fixtures: every cache in tmp_path, a tiny deterministic backbone, generated image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featx.backbones import _BUILTINS, register_backbone
from featx.spec import Preprocessing

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = "featx:tiny_test"


def tiny_factory():
    """timm's 0.36M-parameter test EfficientNet with fixed random weights, at 64 px for speed."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    pre = Preprocessing(
        input_size=(64, 64),
        resize_size=72,
        interpolation="bilinear",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    return model, pre, "random-seed0"


def register_tiny() -> None:
    if "tiny_test" not in _BUILTINS:
        register_backbone("tiny_test", tiny_factory, "tests only: tiny random EfficientNet")


register_tiny()


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    """Point featx, torch hub and Hugging Face caches into a temporary folder; no test touches ~/.cache."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FEATX_CACHE_DIR", str(root / "featx"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import; patch its constants too so each test has its own cache.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return root


def make_image(path: Path, seed: int, size=(48, 40), mode="RGB", fmt=None) -> Path:
    """Write a random image (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """``root/<class>/*.png``: 3 classes × 6 images, no splits (featx carves the test split)."""
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog", "emu")):
        for i in range(6):
            make_image(root / name / f"{i:02d}.png", seed=100 * c + i)
    return root


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """``root/{train,val}/<class>/*.jpg``: 2 classes, 5 train and 2 val images each."""
    root = tmp_path / "splits"
    for c, name in enumerate(("ants", "bees")):
        for i in range(5):
            make_image(root / "train" / name / f"{i}.jpg", seed=10 * c + i)
        for i in range(2):
            make_image(root / "val" / name / f"v{i}.jpg", seed=1000 + 10 * c + i)
    return root
