"""Keep freed tensor memory in the heap while a CPU model runs (glibc only).

A convnet forward pass allocates activation buffers of tens to hundreds of megabytes and frees them
at once. glibc serves requests that big with fresh ``mmap`` mappings and unmaps them on ``free``, so
every batch faults in (and the kernel zeroes) the same memory again: on a 2-core machine
EfficientNet-Lite0 spends about half its CPU time in the kernel doing that (``benchmarks/RESULTS.md``).
Turning the mappings off for large blocks lets the freed memory be reused from the heap. The
numbers are untouched; only where the bytes live changes.

This is what the usual advice (``LD_PRELOAD`` jemalloc or tcmalloc, as ``torch.backends.xeon.run_cpu``
does) achieves, without a preload or an extra library. Set ``FEATX_MALLOC_TUNING=0`` to turn it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import threading
from collections.abc import Iterator

__all__ = ["reuse_freed_memory"]

log = logging.getLogger(__name__)


# mallopt(3) parameters and glibc's defaults (malloc/malloc.c).
_M_TRIM_THRESHOLD = -1


_M_MMAP_MAX = -4


_DEFAULT_TRIM_THRESHOLD = 128 * 1024


_DEFAULT_MMAP_MAX = 65536


_NEVER_TRIM = 2**31 - 1


_lock = threading.Lock()


_depth = 0


@functools.cache  # find_library may run ldconfig or a compiler: once per process
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _enabled() -> bool:
    return os.environ.get("FEATX_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, large freed blocks stay in the heap for the next batch.

    On leaving, glibc's defaults come back and the heap is trimmed, so the memory is returned to
    the system. Nested and concurrent uses are counted; the outermost exit restores. A no-op (that
    yields ``False``) on other C libraries, when ``enabled`` is false, or when ``FEATX_MALLOC_TUNING=0``.

    Yields
    ------
    bool
        Whether the tuning is in effect.
    """
    global _depth
    libc = _glibc() if enabled and _enabled() else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0 and not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)):
            log.debug("mallopt refused the settings; running with the allocator's defaults")
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
