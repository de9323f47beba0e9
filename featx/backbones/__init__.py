"""Backbones: ``SOURCE:NAME[.TAG]`` names resolved into pretrained networks, their preprocessing and layers.

- :mod:`~featx.backbones.names` parses and lists names and holds the ``featx:`` registry (no weights loaded);
- :mod:`~featx.backbones.loading` builds the network and its preprocessing, safely, from any source;
- :mod:`~featx.backbones.features` picks layers out of it (FX) and pools them;
- :mod:`~featx.backbones.folding` folds batch norms into convolutions for extraction;
- :mod:`~featx.backbones.pixels` registers the no-transfer baselines ``featx:pixels`` and ``featx:pixels32``.
"""

from featx.backbones import pixels as _pixels  # noqa: F401  # registers featx:pixels and featx:pixels32
from featx.backbones.features import Backbone, FeatureModel, Headless
from featx.backbones.loading import load_backbone
from featx.backbones.names import (
    PENULTIMATE,
    BackboneInfo,
    BackboneName,
    list_backbones,
    parse_backbone_name,
    register_backbone,
    resolve_backbone,
)
from featx.spec import DEFAULT_BACKBONE

__all__ = [
    "DEFAULT_BACKBONE",
    "PENULTIMATE",
    "Backbone",
    "BackboneInfo",
    "BackboneName",
    "FeatureModel",
    "Headless",
    "list_backbones",
    "load_backbone",
    "parse_backbone_name",
    "register_backbone",
    "resolve_backbone",
]
