"""featx: frozen convnet features, cached with provenance, for transfer learning on images.

The stages, each its own module:

- :mod:`featx.data` turns an image source into a :class:`~featx.data.Manifest`;
- :mod:`featx.backbones` resolves ``SOURCE:NAME[.TAG]`` into a pretrained network and its preprocessing;
- :mod:`featx.extract` batch-embeds a manifest into an HDF5 feature store;
- :mod:`featx.store` reads and writes those stores;
- :mod:`featx.classify` trains scikit-learn classifiers on stored features (:mod:`featx.metrics` scores them);
- :class:`featx.ConvNetFeatures` is a scikit-learn transformer from image paths to features.
"""

__version__ = "0.1.0"

from featx.spec import ExtractionSpec, Preprocessing

__all__ = ["ConvNetFeatures", "ExtractionSpec", "Preprocessing", "__version__"]


def __getattr__(name: str):
    # Imported lazily: the transformer pulls in torch and scikit-learn, `import featx` should not.
    if name == "ConvNetFeatures":
        from featx.sklearn import ConvNetFeatures

        return ConvNetFeatures
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
