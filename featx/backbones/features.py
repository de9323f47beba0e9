"""A loaded backbone and the features taken from it: layers picked out of its FX graph, then pooled.

:class:`Backbone` is the frozen network with its preprocessing; :meth:`Backbone.feature_model` truncates it
to the asked layers (a :class:`FeatureModel`, images in, one ``[N, D]`` tensor per layer out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featx.backbones.folding import fold_batchnorm
from featx.backbones.names import PENULTIMATE, BackboneName, parse_backbone_name
from featx.exceptions import unknown
from featx.spec import Preprocessing, check_option

__all__ = [
    "Backbone",
    "FeatureModel",
    "Headless",
    "bytes_per_image",
    "feature_dims",
    "human_bytes",
    "pool_features",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ loading
class Headless(nn.Module):
    """Base class of a network without a classifier, whose ``penultimate`` layer it names itself.

    :meth:`Backbone.penultimate_node` finds a network's penultimate layer as the input of its classifier;
    a network with none (``featx:pixels``) names that FX node in :attr:`penultimate` instead, and says in
    :attr:`no_classifier` why it has none, which is why it cannot be fine-tuned
    (:meth:`Backbone.classifier_name` raises it).

    Attributes
    ----------
    penultimate : str
        The FX node whose output is the ``penultimate`` layer.
    no_classifier : str
        Why the network has no classifier, as the end of a sentence ("... cannot be fine-tuned: <reason>").
    """

    penultimate: str
    no_classifier: str = "it has no classifier to replace"


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
    parsed : BackboneName
        ``name`` parsed (resolved when :func:`~featx.backbones.loading.load_backbone` made it), for code that
        needs its source, architecture or tag.
    """

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str
    parsed: BackboneName = None  # type: ignore[assignment]  # filled in from ``name`` when not given

    def __post_init__(self) -> None:
        if self.parsed is None:
            self.parsed = parse_backbone_name(self.name)

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
        """The FX node whose output the classifier consumes (the last Linear's input; Conv2d if none), or
        the node a :class:`Headless` network names."""
        if isinstance(self.model, Headless):
            return self.model.penultimate
        return self._classifier_call()[1]

    def classifier_name(self) -> str:
        """The module name of the final classifier (the last Linear in execution order; Conv2d if none).

        Raises
        ------
        ValueError
            For a :class:`Headless` network (``featx:pixels``), which has none and so cannot be fine-tuned;
            the message says why and what to do instead.
        """
        if isinstance(self.model, Headless):
            raise ValueError(
                f"{self.name} cannot be fine-tuned: {self.model.no_classifier}. Fine-tune a pretrained backbone "
                "instead (e.g. --backbone featx:efficientnet_lite0); to use it as the no-transfer baseline, extract "
                f"its features and train a classifier on them (featx extract SOURCE --backbone {self.name}, then "
                "featx train STORE -c logreg)"
            )
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

        check_option("pool", pool)
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
        check_option("pool", pool)
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
            extractor, n = fold_batchnorm(self.extractor)
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


def pool_features(t: torch.Tensor, pool: str, gem_p: float = 3.0) -> torch.Tensor:
    """Reduce a layer output to ``[N, D]`` float32.

    4-D ``[N, C, H, W]`` maps are pooled over space, 3-D ``[N, T, C]`` token sequences over tokens;
    2-D outputs are already vectors. ``avgmax`` concatenates average and max (``2C`` values); ``gem``
    is generalised-mean pooling (p = 3, activations clamped at 1e-6); ``none`` flattens.
    """
    check_option("pool", pool)
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
