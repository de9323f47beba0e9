"""Classifier sweeps on a Dask cluster, through joblib's Dask backend (no home-made cluster code).

The C (or alpha) search runs its folds with joblib; inside :func:`scheduler` joblib sends them to the workers
of a running Dask scheduler instead of local processes. Nothing else changes: the same tasks, the same
scores, the same chosen value. Needs the ``dask`` extra: ``pip install 'featx[dask]'``.

Example
-------
>>> from featx.classify import train
>>> from featx.classify.cluster import scheduler
>>> with scheduler("tcp://10.0.0.5:8786"):  # doctest: +SKIP
...     model, results = train("features.h5")
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["scheduler"]

log = logging.getLogger(__name__)


_INSTALL = "pip install 'featx[dask]'"


def _import_distributed():
    try:
        import distributed
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"running sweeps on a Dask scheduler needs dask.distributed, which is not installed ({exc}); "
            f"install it with: {_INSTALL}"
        ) from None
    return distributed


@contextlib.contextmanager
def scheduler(address: str | None, *, timeout: float = 10.0) -> Iterator[Any]:
    """Run featx's joblib work (the C search's folds) on the Dask cluster at ``address``.

    Parameters
    ----------
    address : str or None
        The scheduler's address, e.g. ``tcp://10.0.0.5:8786`` (what ``dask scheduler`` prints). ``None``
        changes nothing: joblib keeps its local processes, and the context yields ``None``.
    timeout : float, default=10.0
        Seconds to wait for the scheduler to answer.

    Yields
    ------
    distributed.Client or None
        The client, connected for the duration of the block and closed after it.

    Raises
    ------
    ModuleNotFoundError
        ``dask.distributed`` is not installed (``pip install 'featx[dask]'``).
    ConnectionError
        Nothing answers at ``address``; the message names it and how to start one.

    Notes
    -----
    Arguments over 1 kB (the feature matrix, the labels, the fold indices) are scattered to the cluster once
    per search by joblib's Dask backend and shared by every task on it, not sent with each task. Workers need
    featx and the same scikit-learn installed; they need no access to the feature store, which is read on
    the client.
    """
    if address is None:
        yield None
        return
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"scheduler address {address!r}: give one such as tcp://HOST:8786")
    distributed = _import_distributed()
    from joblib import parallel_config

    try:
        # A malformed address (no protocol) is refused before any client, and its event-loop thread, is started.
        distributed.comm.parse_address(address, strict=True)
        client = distributed.Client(address, timeout=timeout)
    except ValueError as exc:  # malformed: no protocol, no port, unknown protocol
        raise ValueError(
            f"scheduler address {address!r} is not a Dask address ({exc}); give PROTOCOL://HOST:PORT as "
            "`dask scheduler` prints it, e.g. tcp://10.0.0.5:8786"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"no Dask scheduler answered at {address!r} within {timeout:g} s ({type(exc).__name__}: {exc}); "
            "start one with `dask scheduler` and workers with `dask worker ADDRESS`, then pass the address it "
            "prints (tcp://HOST:8786), or leave --scheduler out to run locally"
        ) from None
    try:
        workers = len(client.scheduler_info().get("workers", {}))
        log.info("sweeps run on the Dask scheduler at %s (%d workers now)", address, workers)
        with parallel_config(backend="dask"):
            yield client
    finally:
        client.close()
