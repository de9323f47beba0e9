"""Where featx keeps its caches, and the library versions recorded in every artefact."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

__all__ = ["cache_dir", "library_versions"]


def cache_dir() -> Path:
    """The featx cache folder: ``$FEATX_CACHE_DIR``, else ``$XDG_CACHE_HOME/featx``, else ``~/.cache/featx``."""
    explicit = os.environ.get("FEATX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featx"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the numbers in a store."""
    import featx

    versions = {"featx": featx.__version__}
    for dist in ("torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
