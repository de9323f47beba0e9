"""Loading a backbone by name: the network, its weights (never by running pickled code), their preprocessing.

Every source ends in one :class:`~featx.backbones.features.Backbone`: the full network in eval mode on the
CPU, the preprocessing from the weights' own metadata, and a checksum of every tensor for the cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from featx._runtime.env import temporary_environ
from featx.backbones.features import Backbone
from featx.backbones.names import _BUILTINS, BackboneName, _hf_hub_cache, resolve_backbone
from featx.spec import DEFAULT_BACKBONE, Preprocessing

__all__ = ["build_architecture", "load_backbone", "weights_checksum"]

log = logging.getLogger(__name__)


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _offline_hint(name: str, where: str) -> str:
    return (
        f"could not download the weights of {name}: this machine may have no network. Pre-seed the cache "
        f"({where}), load a checkpoint with file:ARCH=PATH, or use the offline built-in {DEFAULT_BACKBONE}."
    )


def _torchvision_preprocessing(weights) -> Preprocessing:
    t = weights.transforms()
    crop = int(t.crop_size[0])
    return Preprocessing(
        input_size=(crop, crop),
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
    )


def _timm_preprocessing(model: nn.Module, name: str) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model, use_test_size=True)
    if cfg.get("crop_mode", "center") != "center":
        log.warning("%s asks for crop_mode=%r; featx uses a centre crop", name, cfg["crop_mode"])
    _, h, w = cfg["input_size"]
    return Preprocessing.from_crop_pct((h, w), cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"])


def _unpickling_reason(exc: Exception) -> str:
    """The one informative line of torch's long weights_only refusal (e.g. ``Unsupported global: ...``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError: not a (complete) safetensors file
            raise ValueError(f"checkpoint {str(path)!r} is not a readable .safetensors file: {exc}") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError and friends
            raise ValueError(
                f"checkpoint {str(path)!r} cannot be read safely ({type(exc).__name__}: {_unpickling_reason(exc)}). "
                "featx loads with weights_only=True and never runs pickled code: save a plain state_dict "
                "(torch.save(model.state_dict(), path)) or a .safetensors file"
            ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no state dict (a mapping of names to tensors, possibly under "
            "'state_dict', 'model' or 'model_state_dict')"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier_outputs(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> int | None:
    """If only the final classifier's shape differs from the checkpoint, its class count there."""
    own = model.state_dict()
    differing = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not differing:
        return None
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    head = linears[-1] if linears else None
    if head and all(k in (f"{head}.weight", f"{head}.bias") for k in differing):
        return int(state[f"{head}.weight"].shape[0])
    raise ValueError(
        f"{what}: {len(differing)} tensors have other shapes (checkpoint vs architecture): "
        + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in differing[:5])
        + ". Is the checkpoint of another architecture?"
    )


def _build_checkpoint(family: str, arch: str, path: Path) -> tuple[nn.Module, Preprocessing]:
    state = _read_state_dict(path)
    if family == "torchvision":
        from torchvision.models import get_model, get_model_weights

        def build(num_classes: int | None = None) -> nn.Module:
            return get_model(arch, weights=None, **({"num_classes": num_classes} if num_classes else {}))

        pre = _torchvision_preprocessing(get_model_weights(arch).DEFAULT)
    else:
        import timm

        def build(num_classes: int | None = None) -> nn.Module:
            return timm.create_model(arch, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))

        pre = None
    model = build()
    classes = _classifier_outputs(model, state, f"checkpoint {str(path)!r} does not fit {family}:{arch}")
    if classes is not None:
        model = build(classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        problems = [
            f"{len(keys)} {kind} tensors (e.g. {', '.join(keys[:3])})"
            for kind, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {family}:{arch}: {'; '.join(problems)}. "
            "Is the checkpoint of another architecture?"
        )
    if pre is None:
        pre = _timm_preprocessing(model, f"timm:{arch}")
    return model, pre


def _weights_only_loads() -> contextlib.AbstractContextManager[None]:
    """Make every ``torch.load`` inside (torch.hub's cache included) refuse pickled code.

    torchvision's builders load cached weights with ``weights_only=False``; a file planted in the cache
    could otherwise run code. PyTorch reads this switch at each call.
    """
    return temporary_environ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")


def load_backbone(name: str | BackboneName) -> Backbone:
    """Load a backbone by name, with its weights and their preprocessing, in eval mode on the CPU.

    Parameters
    ----------
    name : str or BackboneName
        ``SOURCE:NAME[.TAG]`` or ``file:ARCH=PATH`` (see :mod:`featx.backbones.names`), or a name parsed
        or resolved before (a resolved one is not checked again).

    Raises
    ------
    UnknownNameError
        Unknown source, model, tag (with close matches).
    RuntimeError
        Weights could not be downloaded (no network and no cached copy).
    """
    resolved = resolve_backbone(name)
    if resolved.source == "featx":
        model, pre, weights = _BUILTINS[resolved.arch].factory()
    elif resolved.source == "torchvision":
        from torchvision.models import get_model, get_model_weights

        w = get_model_weights(resolved.arch)[resolved.tag]
        try:
            with _weights_only_loads():
                model = get_model(resolved.arch, weights=w)
        except pickle.UnpicklingError as exc:
            where = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
            raise ValueError(
                f"the cached weights {where} contain pickled objects beyond tensors and were not loaded "
                f"({_unpickling_reason(exc)}); delete the file so it is downloaded again, "
                "or replace it with the original"
            ) from None
        except OSError as exc:  # URLError is an OSError
            where = str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url))
            raise RuntimeError(_offline_hint(str(resolved), f"put {w.url} at {where}")) from exc
        pre, weights = _torchvision_preprocessing(w), w.name
    elif resolved.source == "timm":
        import timm

        try:
            with _weights_only_loads():
                model = timm.create_model(f"{resolved.arch}.{resolved.tag}", pretrained=True)
        except OSError as exc:  # also huggingface_hub's offline / connection errors
            cfg = timm.models.get_pretrained_cfg(f"{resolved.arch}.{resolved.tag}")
            hub_id = getattr(cfg, "hf_hub_id", None)
            where = (
                f"Hugging Face repo {hub_id} in {_hf_hub_cache()}"
                if hub_id
                else f"{getattr(cfg, 'url', '') or 'its weights'} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
            )
            raise RuntimeError(_offline_hint(str(resolved), where)) from exc
        pre, weights = _timm_preprocessing(model, str(resolved)), resolved.tag
    else:
        model, pre = _build_checkpoint(resolved.family, resolved.model, Path(resolved.path))
        weights = Path(resolved.path).name
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(str(resolved), model, pre, weights, weights_checksum(model), parsed=resolved)


def build_architecture(name: str | BackboneName) -> Backbone:
    """A backbone's network without its weights (randomly initialised), to look at its layers offline.

    The FX graph, hence the layer names and ``penultimate``, does not depend on the weights, so listing them
    needs no download. Never extract with the result: its ``weights`` is ``"none"`` and ``weights_sha256``
    is empty. A ``featx:`` built-in and a ``file:`` checkpoint are loaded as :func:`load_backbone` does (they
    are local); only the downloading sources skip their weights.

    Raises
    ------
    UnknownNameError
        Unknown source, model, tag (with close matches).
    """
    resolved = resolve_backbone(name)
    if resolved.source == "torchvision":
        from torchvision.models import get_model, get_model_weights

        model = get_model(resolved.arch, weights=None)
        pre = _torchvision_preprocessing(get_model_weights(resolved.arch)[resolved.tag])
    elif resolved.source == "timm":
        import timm

        model = timm.create_model(f"{resolved.arch}.{resolved.tag}", pretrained=False)
        pre = _timm_preprocessing(model, str(resolved))
    else:
        return load_backbone(resolved)
    return Backbone(str(resolved), model.eval(), pre, "none", "", parsed=resolved)
