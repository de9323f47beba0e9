"""Where featx keeps its caches, and the library versions recorded in every artefact."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

__all__ = ["cache_dir", "default_workers", "library_versions"]


def cache_dir() -> Path:
    """The featx cache folder: ``$FEATX_CACHE_DIR``, else ``$XDG_CACHE_HOME/featx``, else ``~/.cache/featx``."""
    explicit = os.environ.get("FEATX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featx"


def default_workers(environ: dict[str, str] | None = None) -> int:
    """DataLoader workers when none are asked for: the node's cores (at most 8), shared by the ranks that
    ``torchrun`` starts on it (``LOCAL_WORLD_SIZE``), so several ranks do not oversubscribe one machine."""
    environ = os.environ if environ is None else environ
    ranks_here = max(1, int(environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(8, (os.cpu_count() or 1) // ranks_here))


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
