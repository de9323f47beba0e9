"""featx: frozen convnet features, cached with provenance, for transfer learning on images.

The stages, each its own module:

- :mod:`featx.data` turns an image source into a :class:`~featx.data.Manifest`;
- :mod:`featx.backbones` resolves ``SOURCE:NAME[.TAG]`` into a pretrained network and its preprocessing;
- :mod:`featx.extract` batch-embeds a manifest into an HDF5 feature store;
- :mod:`featx.store` reads and writes those stores.
"""

__version__ = "0.1.0"

from featx.spec import ExtractionSpec, Preprocessing

__all__ = ["ExtractionSpec", "Preprocessing", "__version__"]
