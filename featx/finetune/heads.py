"""The network fine-tuning trains: its new head (optionally from a probe, for LP-FT), blocks and freezing.

- :func:`block_names` splits a backbone into blocks, input to output, for ``topK`` phases;
- :func:`head_from_logreg` turns a ``featx train -c logreg`` model into a linear head (exactly equal, or with its
  near-dead features' weights capped);
- the private helpers build the head, swap it in, freeze per phase and keep frozen statistics frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.backbones.features import Backbone
from featx.backbones.names import BackboneName
from featx.exceptions import SpecMismatchError, UnknownNameError
from featx.finetune.config import Phase
from featx.spec import Preprocessing

__all__ = ["block_names", "head_from_logreg"]


# ------------------------------------------------------------------------------------------ blocks
def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Containers that hold a network's stages (torchvision: features, trunk_output, encoder.layers).
_TRUNK_CONTAINERS = ("features", "trunk_output", "encoder", "layers", "blocks", "stages")


def _generic_blocks(model: nn.Module, head: str) -> list[list[str]]:
    """Blocks of a network without timm metadata: its top-level children in order, descending into the
    trunk container that holds most of the parameters (``features``, ``encoder.layers``, …) and into the
    container that holds the head (VGG's ``classifier``: fc6 and fc7 are blocks)."""
    total = _n_params(model)
    blocks: list[list[str]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == head or _n_params(child) == 0:
                continue
            holds_head = head.startswith(full + ".")
            trunk = name in _TRUNK_CONTAINERS and _n_params(child) > 0.5 * total
            if list(child.children()) and (holds_head or trunk):
                visit(full + ".", child)
            else:
                blocks.append([n for n, _ in child.named_parameters(prefix=full)])

    visit("", model)
    return blocks


def block_names(backbone: Backbone) -> list[list[str]]:
    """The backbone's blocks, input to output, each a list of parameter names (the head excluded).

    timm models (and the built-in) use timm's own coarse group matcher (stem, then stages); others are
    split at their top-level children (see :func:`_generic_blocks`).
    """
    model = backbone.model
    head = backbone.classifier_name()
    if hasattr(model, "group_matcher"):
        from timm.models._manipulate import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        blocks = [
            [n for n in names if not (n == head or n.startswith(head + "."))] for _, names in sorted(groups.items())
        ]
        return [b for b in blocks if b]
    return _generic_blocks(model, head)


# -------------------------------------------------------------------------------------------- heads
def build_head(in_features: int, n_classes: int, hidden: Sequence[int], dropout: float) -> nn.Module:
    if not hidden:
        return (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, n_classes))
            if dropout
            else nn.Linear(in_features, n_classes)
        )
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_same_split(model_file: str | Path, probe: dict[str, str] | None, finetune: dict[str, str]) -> None:
    """Refuse an LP-FT probe trained on other images than the fine-tune's train split (a leak, or another plan)."""
    fix = (
        "train the probe on a store of these images under the fine-tune's split plan (the same --split-seed, "
        "--val-fraction and --test-fraction for `featx train` and `featx finetune`)"
    )
    if probe is None:
        raise SpecMismatchError(
            f"--init-head {model_file} records no split plan (it was trained by a featx before 0.x split plans), so "
            f"it may have seen this fine-tune's val or test images; {fix}"
        )
    differ = [s for s in ("train", "val", "test") if probe.get(s) != finetune.get(s)]
    if differ:
        detail = "; ".join(f"{s}: probe {probe.get(s)}, fine-tune {finetune.get(s)}" for s in differ)
        raise SpecMismatchError(
            f"--init-head {model_file} was trained under another split plan: its {', '.join(differ)} image(s) differ "
            f"from this fine-tune's ({detail}), so its head may already have fitted the fine-tune's val or test "
            f"images; {fix}"
        )


def _check_fitted_on(model_file: str | Path, splits: list[str], expected: list[str]) -> None:
    """Refuse a probe fit on other splits than the step it starts needs (a probe fit on val biases the epoch choice
    towards epoch 0, the probe itself)."""
    if splits == expected:
        return
    if expected == ["train"]:
        raise SpecMismatchError(
            f"--init-head {model_file} was fit on {'+'.join(splits)}: val, which chooses the fine-tune's rate and "
            "epoch, would judge a head that has seen it; start from a probe fit on train (`featx train` with the "
            "default --refit train), or fine-tune with --refit train+val, which starts from the probe's "
            "model-train.skops"
        )
    raise SpecMismatchError(
        f"--init-head {model_file} was fit on {'+'.join(splits)}, and the refit on train+val starts from a probe fit "
        "on train+val: give the model.skops of `featx train --refit train+val`"
    )


def head_from_logreg(
    model_file: str | Path,
    backbone: Backbone,
    class_names: Sequence[str],
    trust: bool = False,
    split_hashes: dict[str, str] | None = None,
    fitted_on: Sequence[str] = ("train",),
    scale_floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a linear head equal to a stage-2 logistic regression (LP-FT, Kumar et al. 2022).

    The logistic regression must be trained on this backbone's ``penultimate`` features with ``standard``
    or no preprocessing: standardisation is folded into the weights, so ``head(x)`` equals the regression's
    decision function on the raw features exactly (up to float rounding) when ``scale_floor`` is 0. With a
    ``scale_floor``, each feature's standard deviation is floored at ``scale_floor`` times their median before it
    is folded (the median of the scaler's scales, where scikit-learn gives a constant feature a scale of 1): a feature
    the backbone almost never activates (digits' upsampled glyphs leave 138 of Lite0's 1,280 channels below 1 % of
    the median std, one at 3e-6) would otherwise get a weight of 1/std, up to 4,741, in the head, and the backbone's
    first updates, waking that channel, would swing the logits by as much. Given the fine-tune's
    ``split_hashes``, the probe must have been trained under the same split plan: a probe that saw the
    fine-tune's val or test images would leak them into its starting point; and it must have been fit on the
    splits ``fitted_on`` (train alone where val then chooses the fine-tune's epoch, train and val for the refit
    of ``refit="train+val"``).
    """
    from featx.classify.model import load_model

    trained = load_model(model_file, trust=trust)
    if split_hashes is not None:
        _check_same_split(model_file, trained.split_hashes, split_hashes)
    _check_fitted_on(model_file, trained.meta.get("trained_on", {}).get("splits", ["train"]), list(fitted_on))
    spec = trained.meta["store_spec"]
    if spec["backbone"] != backbone.name or spec["weights_sha256"] != backbone.weights_sha256:
        raise SpecMismatchError(
            f"--init-head model was trained on features of {spec['backbone']} (weights {spec['weights_sha256'][:12]}), "
            f"not {backbone.name} (weights {backbone.weights_sha256[:12]}); train it on a store of this backbone"
        )
    if trained.layer != "penultimate" or spec.get("pool") not in ("avg", None):
        raise ValueError("--init-head needs a model trained on the 'penultimate' layer with avg pooling")
    if list(trained.class_names) != list(class_names):
        raise SpecMismatchError(
            f"--init-head model's classes {trained.class_names} differ from the data's {list(class_names)}"
        )
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    steps = trained.pipeline.steps
    clf = steps[-1][1]
    if not isinstance(clf, LogisticRegression):
        raise ValueError(f"--init-head needs a logistic regression (featx train -c logreg), not {type(clf).__name__}")
    W = np.asarray(clf.coef_, dtype=np.float64)
    b = np.asarray(clf.intercept_, dtype=np.float64)
    for name, step in reversed(steps[:-1]):
        if isinstance(step, StandardScaler):
            scale = step.scale_ if step.scale_ is not None else np.ones(W.shape[1])
            scale = np.maximum(scale, scale_floor * np.median(scale))
            mean = step.mean_ if step.mean_ is not None else np.zeros(W.shape[1])
            b = b - (W / scale) @ mean
            W = W / scale
        else:
            raise ValueError(
                f"--init-head: the logistic regression uses preprocessing {name!r}, which cannot be folded into a "
                "linear head; train it with --preprocess standard (the default) or none"
            )
    n = len(class_names)
    if W.shape[0] == 1 and n == 2:  # binary: softmax([0, z]) = sigmoid(z)
        W = np.vstack([np.zeros_like(W), W])
        b = np.concatenate([[0.0], b])
    full_W = np.zeros((n, W.shape[1]))
    full_b = np.full(n, -1e4)  # classes the regression never saw stay improbable
    full_W[clf.classes_] = W
    full_b[clf.classes_] = b
    return torch.tensor(full_W, dtype=torch.float32), torch.tensor(full_b, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- model
class ClassifierNet(nn.Module):
    """The backbone with its new head, plus on-device normalisation from uint8 pixels."""

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.net = model
        self.preprocessing = pre  # what the input pixels must be resized and cropped to
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)


def set_trainable(model: nn.Module, blocks: list[list[str]], head: str, phase: Phase) -> set[str]:
    """Freeze everything but what the phase trains; returns the trainable parameter names."""
    if phase.freeze == "all":
        trainable = {n for n, _ in model.named_parameters()}
    else:
        k = 0 if phase.freeze == "head" else int(phase.freeze[3:])
        if k > len(blocks):
            raise UnknownNameError(
                f"phase {phase.freeze}: this backbone has only {len(blocks)} blocks (top1 … top{len(blocks)})"
            )
        trainable = {n for block in blocks[len(blocks) - k :] for n in block} if k else set()
        trainable |= {n for n, _ in model.named_parameters() if n == head or n.startswith(head + ".")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return trainable


def set_train_mode(model: nn.Module, update_bn_stats: bool = False) -> None:
    """Train mode, except BatchNorm layers: frozen ones always keep their statistics, trainable ones too
    unless ``update_bn_stats`` (their affine parameters still train either way)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
            params = list(module.parameters(recurse=False))
            frozen = params and not any(p.requires_grad for p in params)
            if frozen or (isinstance(module, nn.modules.batchnorm._BatchNorm) and not update_bn_stats):
                module.eval()


def block_family(net: Backbone) -> str:
    """``timm:ARCH`` or ``torchvision:ARCH`` of a loaded backbone, to re-load its weights with ``file:``."""
    cfg = getattr(net.model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    return f"{net.parsed.family}:{net.parsed.model}"


def model_label(name: BackboneName) -> str:
    """The backbone's name without its source (``resnet50.IMAGENET1K_V2``), as a results row shows it."""
    if name.source == "file":
        return f"{name.arch}={name.path}"
    return name.arch + (f".{name.tag}" if name.tag else "")
