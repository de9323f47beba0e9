"""Where a classifier computes: NumPy on the host, or scikit-learn's own estimators on torch tensors (CUDA).

scikit-learn runs some estimators on any Array API namespace under ``sklearn.config_context(array_api_dispatch=
True)``: the same ``LogisticRegression`` (lbfgs) fits torch tensors, on the CPU or on CUDA, where its
multinomial loss and gradient are matrix products on the device and only lbfgs's parameter vector goes through
SciPy on the host. featx re-implements no solver: it chooses the path, moves the features once, keeps the search
folds as views where they are contiguous, and hands back a pipeline whose fitted arrays are NumPy again, so the
saved model loads and predicts anywhere.

The paths (:data:`PATHS`, chosen by ``array_path`` or the ``FEATX_ARRAY_PATH`` environment variable):

``auto`` (default)
    CUDA when a GPU is there, every step of the pipeline supports the Array API
    (``__sklearn_tags__().array_api_support``) and the fit's estimated memory fits in the device's free memory;
    otherwise NumPy, and the reason is logged and recorded. On a CPU the NumPy path stays: the torch CPU path
    took 0.74-1.14x its time for the same fit (issue 28; benchmarks/RESULTS.md, "The classical stage at scale").
``numpy``
    The host path, always.
``torch``
    torch tensors on the CPU: the very code the CUDA path runs, testable without a GPU.
``cuda``
    torch tensors on the current CUDA device; an error where there is none or the pipeline has no support.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featx._runtime.env import temporary_environ

__all__ = [
    "ENV",
    "PATHS",
    "ArrayPath",
    "choose_path",
    "cuda_free_bytes",
    "supports_array_api",
    "take",
    "to_host",
    "to_numpy_pipeline",
]

log = logging.getLogger(__name__)

#: The array paths a classifier can be asked to take.
PATHS = ("auto", "numpy", "torch", "cuda")
#: The environment variable that chooses the path when the caller does not.
ENV = "FEATX_ARRAY_PATH"


@dataclass(frozen=True)
class ArrayPath:
    """The arrays one fit runs on.

    Attributes
    ----------
    name : {"numpy", "torch", "cuda"}
    reason : str
        Why this path was taken (recorded with the model, logged).
    """

    name: str
    reason: str

    @property
    def on_torch(self) -> bool:
        """The fit runs on torch tensors under scikit-learn's Array API dispatch."""
        return self.name != "numpy"

    @property
    def device(self) -> str | None:
        """The torch device (``"cpu"``, ``"cuda"``), or None on the NumPy path."""
        return {"numpy": None, "torch": "cpu", "cuda": "cuda"}[self.name]

    def put(self, array: np.ndarray) -> Any:
        """``array`` on this path: itself on NumPy, else one torch tensor on the device (float32 features kept
        float32; a CPU tensor shares the NumPy buffer)."""
        if not self.on_torch:
            return array
        import torch

        return torch.as_tensor(np.ascontiguousarray(array), device=self.device)

    @contextlib.contextmanager
    def dispatch(self) -> Iterator[None]:
        """scikit-learn's Array API dispatch on, for the torch paths (a no-op on NumPy).

        scikit-learn checks that ``SCIPY_ARRAY_API=1`` before it turns dispatch on, for estimators that hand
        device arrays to SciPy. The estimators this path takes (:func:`supports_array_api`) hand SciPy NumPy
        arrays only (lbfgs's parameter vector), so the variable is set for the dispatch and restored after it.
        """
        if not self.on_torch:
            yield
            return
        import sklearn

        with temporary_environ("SCIPY_ARRAY_API", "1"), sklearn.config_context(array_api_dispatch=True):
            yield


def supports_array_api(pipeline: Pipeline) -> tuple[bool, str]:
    """Whether every step of ``pipeline`` runs on Array API arrays (its ``array_api_support`` tag), and if not
    which step does not."""
    for name, step in pipeline.steps:
        tags = getattr(step, "__sklearn_tags__", None)
        if tags is None or not getattr(tags(), "array_api_support", False):
            return False, f"{type(step).__name__} ({name}) has no Array API support in scikit-learn"
    return True, "every step supports the Array API"


def _dispatch_problem() -> str | None:
    """Why scikit-learn cannot dispatch to torch here (no torch, SciPy too old), or None."""
    try:
        import torch  # noqa: F401
        from sklearn.utils._array_api import _check_array_api_dispatch
    except ImportError as exc:
        return f"Array API dispatch is unavailable ({exc})"
    try:
        with temporary_environ("SCIPY_ARRAY_API", "1"):
            _check_array_api_dispatch(True)
    except (ImportError, RuntimeError) as exc:
        return f"scikit-learn cannot dispatch to torch ({exc})"
    return None


def cuda_free_bytes() -> int | None:
    """Free memory on the current CUDA device, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def choose_path(pipeline: Pipeline, requested: str | None = None, need_bytes: int | None = None) -> ArrayPath:
    """The array path of one fit.

    Parameters
    ----------
    pipeline : Pipeline
        The unfitted preprocessing steps and estimator.
    requested : {"auto", "numpy", "torch", "cuda"}, optional
        By default ``$FEATX_ARRAY_PATH``, else ``auto``.
    need_bytes : int, optional
        The fit's estimated peak memory on the device (:func:`featx.classify.memory.estimate`); ``auto`` stays
        on the host when it exceeds the GPU's free memory.

    Returns
    -------
    ArrayPath

    Raises
    ------
    ValueError
        An unknown path; ``torch`` or ``cuda`` asked of a pipeline without support or a machine without the device.
    """
    requested = requested or os.environ.get(ENV) or "auto"
    if requested not in PATHS:
        raise ValueError(f"array path {requested!r}: use one of {', '.join(PATHS)} (or unset {ENV})")
    if requested == "numpy":
        return ArrayPath("numpy", "asked for")
    ok, why = supports_array_api(pipeline)
    problem = None if ok else why
    problem = problem or _dispatch_problem()
    if requested == "torch":
        if problem:
            raise ValueError(f"array path torch: {problem}; use --array-path numpy (FEATX_ARRAY_PATH=numpy)")
        return ArrayPath("torch", "asked for")
    free = cuda_free_bytes()
    if requested == "cuda":
        if problem or free is None:
            raise ValueError(
                f"array path cuda: {problem or 'no CUDA device is visible to torch'}; use numpy or auto instead"
            )
        return ArrayPath("cuda", "asked for")
    if free is None:
        return ArrayPath("numpy", "no CUDA device (on the CPU NumPy is as fast as torch: RESULTS.md, issue 28)")
    if problem:
        return ArrayPath("numpy", problem)
    if need_bytes is not None and need_bytes > free:
        return ArrayPath(
            "numpy",
            f"the fit needs an estimated {need_bytes / 2**30:.1f} GiB, the GPU has {free / 2**30:.1f} GiB free",
        )
    return ArrayPath("cuda", "a CUDA device with room for the features")


def take(X: Any, idx: np.ndarray) -> Any:
    """The rows ``idx`` of ``X``: a view where they are one ascending run (a val split), else a copy."""
    idx = np.asarray(idx)
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and (len(idx) < 2 or bool(np.all(np.diff(idx) == 1))):
        return X[int(idx[0]) : int(idx[-1]) + 1]
    if isinstance(X, np.ndarray):
        return X[idx]
    import torch

    return X[torch.as_tensor(idx, device=X.device)]


def to_host(value: Any) -> Any:
    """A torch tensor as a NumPy array (from any device); anything else unchanged."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value


def to_numpy_pipeline(pipeline: Pipeline) -> Pipeline:
    """Turn every fitted torch attribute of the pipeline's steps into NumPy, in place, so it loads anywhere."""
    for _, step in pipeline.steps:
        for key, value in list(vars(step).items()):
            converted = to_host(value)
            if converted is not value:
                setattr(step, key, converted)
    return pipeline
