"""The process around featx: where it keeps its caches, the library versions it records, and the
context managers through which it changes process-wide state (and puts it back).

A library call that must change global state (an environment variable, a flag of another library)
does it inside :func:`temporary` (or one of the helpers built on it), so that the process looks the same
afterwards as before. Nested and concurrent uses of one setting are counted: the first entry saves the
value, the last exit restores it, so two threads extracting at once never restore under each other.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "cache_dir",
    "default_workers",
    "library_versions",
    "temporary",
    "temporary_attr",
    "temporary_environ",
    "timestamp",
]

_UNSET = object()  # an environment variable that was not set

_lock = threading.Lock()

_active: dict[str, list[Any]] = {}  # setting -> [users inside, value saved by the first]


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


def timestamp() -> str:
    """Now, as featx records when it made something (a store's, a model's, a results document's ``created_at``):
    ISO 8601, UTC, to the second."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def temporary(
    setting: str, get: Callable[[], Any], put: Callable[[Any], None], value: Any
) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``put(value)``; on leaving, ``put`` back what ``get()`` returned before.

    Parameters
    ----------
    setting : str
        A name that identifies the global: uses with equal names are counted together (the first entry
        saves, the last exit restores) and must ask for the same ``value``.
    get, put : callable
        Read and write the global.
    value :
        The value inside the block.
    """
    return _temporary(setting, get, put, lambda saved: value)


@contextlib.contextmanager
def _temporary(
    setting: str, get: Callable[[], Any], put: Callable[[Any], None], choose: Callable[[Any], Any]
) -> Iterator[None]:
    with _lock:
        entry = _active.get(setting)
        if entry is None:
            entry = _active[setting] = [0, get()]
        entry[0] += 1
        put(choose(entry[1]))
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _active[setting]
                put(entry[1])


def temporary_attr(target: object, name: str, value: Any) -> contextlib.AbstractContextManager[None]:
    """``target.name = value`` within the block (a module flag such as Pillow's), restored afterwards."""
    label = getattr(target, "__name__", type(target).__name__)
    return temporary(
        f"{label}@{id(target)}.{name}", lambda: getattr(target, name), lambda v: setattr(target, name, v), value
    )


def temporary_environ(name: str, value: str, *, keep_existing: bool = False) -> contextlib.AbstractContextManager[None]:
    """The environment variable ``name`` is ``value`` within the block; afterwards as before (unset if it was).

    With ``keep_existing``, a value the variable had before the block wins (``os.environ.setdefault`` for
    the length of the block).
    """

    def put(v: Any) -> None:
        if v is _UNSET:
            os.environ.pop(name, None)
        else:
            os.environ[name] = v

    def choose(saved: Any) -> Any:
        return saved if keep_existing and saved is not _UNSET else value

    return _temporary(f"environ.{name}", lambda: os.environ.get(name, _UNSET), put, choose)
