"""Memory known before it is needed: each preset's peak memory estimated from N, d, classes and dtype.

An in-memory fit holds the features (``N × d``, read once) and, while it searches and refits, a working set
that grows with the rows it fits: the fitted rows' preprocessed copy, the solver's own copies (liblinear
converts to float64 and to its own sparse rows, about seven bytes for every feature byte) and the per-class
scores (``n × classes``). :data:`FOOTPRINTS` holds those multiples for each preset, measured, not guessed:
``python benchmarks/bench_scale.py calibrate`` fits them to peak resident memory (``VmHWM``, reset before the
fit) of one process at small N (benchmarks/RESULTS.md, "The classical stage at scale");
``tests/classify/test_scale.py`` checks the estimate against fresh measurements.

A fit whose estimate exceeds the memory available is refused up front (:class:`InsufficientMemoryError`,
naming the estimate, the memory and the alternatives) instead of being killed mid-search; a parallel search that
would not fit runs on fewer workers first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from featx.exceptions import InsufficientMemoryError

__all__ = ["FOOTPRINTS", "Estimate", "Footprint", "available_bytes", "check_fits", "estimate", "workers_that_fit"]

_MIB = 2**20
_GIB = 2**30


@dataclass(frozen=True)
class Footprint:
    """One preset's measured working memory for fitting ``n`` rows of ``d`` features and ``k`` classes.

    ``work = per_feature · n·d·itemsize + per_class · n·k·8 + per_weight · k·d·8 + fixed_mib · 2**20`` bytes,
    beyond the features held (never below zero).

    Attributes
    ----------
    per_feature : float
        Copies of the fitted rows' features (fold rows, preprocessing output, the solver's own copies).
    per_class : float
        Float64-sized ``n × k`` arrays (scores, probabilities, gradients, one-vs-rest labels).
    per_weight : float
        Float64-sized ``k × d`` arrays (coefficients, lbfgs's history).
    fixed_mib : float
        The intercept of the fit (lazy imports, allocator pools; negative where small fits reuse freed memory).
    """

    per_feature: float
    per_class: float
    per_weight: float = 0.0
    fixed_mib: float = 0.0

    def work(self, n: int, d: int, k: int, itemsize: int = 4) -> int:
        """Working bytes of one fit of ``n`` rows."""
        linear = self.per_feature * n * d * itemsize + self.per_class * n * k * 8 + self.per_weight * k * d * 8
        return max(0, int(linear + self.fixed_mib * _MIB))


#: Relative least squares over peak RSS (VmHWM reset once the features exist) of one process, each preset with its
#: default preprocessing, one search value on a val split then the refit, at three sizes (logreg at six, from
#: 4,800 × 256 × 1,000 classes to 80,000 × 1,280 × 100 fitted rows) on 2 CPU cores, scikit-learn 1.9.1
#: (benchmarks/RESULTS.md, "The classical stage at scale": ``bench_scale.py calibrate``). knn's neighbour search
#: reduces its distances in small chunks, so its working set is the normalised copies of the fold's rows (1.25 at
#: an 80/20 split): fitted to its runs at 9,600 fitted rows and more (10k, 12k, 100k; within 1 %), where the working
#: set is more than the allocator's noise.
FOOTPRINTS: dict[str, Footprint] = {
    "svm": Footprint(per_feature=7.85, per_class=0.05, fixed_mib=-28.1),
    "logreg": Footprint(per_feature=2.42, per_class=1.97, fixed_mib=-5.3),
    "sgd": Footprint(per_feature=2.49, per_class=0.17, fixed_mib=-9.4),
    "ridge": Footprint(per_feature=4.40, per_class=2.33, fixed_mib=-32.3),
    "knn": Footprint(per_feature=1.26, per_class=0.0, fixed_mib=11.6),
    "chance": Footprint(per_feature=0.0, per_class=0.0, fixed_mib=0.0),
}
#: The torch path's working set, measured the same way on torch CPU tensors (taken for CUDA's device memory too,
#: where it is not measured yet: ``benchmarks/gpu_check.sh --scale`` records the device's peak).
TORCH_FOOTPRINTS: dict[str, Footprint] = {
    "logreg": Footprint(per_feature=4.08, per_class=3.78, per_weight=26.6, fixed_mib=1.9),
}
#: A classifier named by import path: the largest preset's footprint (liblinear's), to err on the safe side.
_UNKNOWN = "svm"
#: A search worker's own interpreter: a joblib (loky) worker's RSS once it has imported featx.classify and the
#: estimators (134-137 MiB measured on this machine, 140 with the estimators' modules).
WORKER_MIB = 140.0


@dataclass(frozen=True)
class Estimate:
    """The peak memory of one in-memory fit.

    Attributes
    ----------
    preset : str
    n, d, k : int
        Rows held, features, classes.
    n_fit : int
        Rows one fit sees (the refit's training rows).
    held : int
        Bytes of the features held (read once).
    work : int
        Bytes of one fit's working set.
    workers : int
        Search processes, each with its own working set.
    """

    preset: str
    n: int
    d: int
    k: int
    n_fit: int
    held: int
    work: int
    workers: int = 1

    @property
    def peak(self) -> int:
        """Estimated peak bytes: the features plus the larger of the refit and the parallel search."""
        search = self.workers * self.work + (self.workers - 1) * int(WORKER_MIB * _MIB) if self.workers > 1 else 0
        return self.held + max(self.work, search)

    def describe(self) -> str:
        """``"logreg on 1,000,000 × 1,280, 1,000 classes: 28.4 GiB (features 4.8 GiB + fit 23.6 GiB × 1 worker)"``."""
        return (
            f"{self.preset} on {self.n:,} × {self.d:,}, {self.k:,} classes: {self.peak / _GIB:.1f} GiB "
            f"(features {self.held / _GIB:.1f} GiB + fit {self.work / _GIB:.1f} GiB × {self.workers} "
            f"worker{'s' if self.workers > 1 else ''})"
        )


def estimate(
    preset: str,
    n: int,
    d: int,
    k: int,
    *,
    n_fit: int | None = None,
    itemsize: int = 4,
    workers: int = 1,
    path: str = "numpy",
) -> Estimate:
    """The estimated peak memory of fitting ``preset`` in memory.

    Parameters
    ----------
    preset : str
        A preset name (an import path gets the largest preset's footprint).
    n, d, k : int
        Labelled rows held (train and val), features per row, classes.
    n_fit : int, optional
        Rows of the refit (the train split); ``n`` by default.
    itemsize : int, default=4
        Bytes per feature value (float32).
    workers : int, default=1
        Parallel search processes.
    path : {"numpy", "torch", "cuda"}
        The array path (:mod:`featx.classify.arrays`).

    Returns
    -------
    Estimate
    """
    table = TORCH_FOOTPRINTS if path != "numpy" and preset in TORCH_FOOTPRINTS else FOOTPRINTS
    footprint = table.get(preset, FOOTPRINTS[_UNKNOWN])
    n_fit = n if n_fit is None else n_fit
    return Estimate(preset, n, d, k, n_fit, n * d * itemsize, footprint.work(n_fit, d, k, itemsize), max(1, workers))


def available_bytes() -> int:
    """Memory this process can still take: ``MemAvailable``, bounded by a cgroup limit where one is set."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 2**62  # unknown: nothing is refused
    for limit_file, used_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f, open(used_file) as g:
                limit, used = f.read().strip(), int(g.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            free = min(free, int(limit) - used)
    return free


def workers_that_fit(est: Estimate, available: int) -> int:
    """The most search workers (at most ``est.workers``, at least 1) whose estimate fits in ``available``."""
    for workers in range(est.workers, 0, -1):
        if _with_workers(est, workers).peak <= available:
            return workers
    return 1


def _with_workers(est: Estimate, workers: int) -> Estimate:
    return Estimate(est.preset, est.n, est.d, est.k, est.n_fit, est.held, est.work, workers)


def check_fits(
    est: Estimate, available: int | None = None, held_already: bool = False, where: str = "memory available"
) -> None:
    """Refuse a fit whose estimate exceeds the memory available, before any of it is allocated.

    Parameters
    ----------
    est : Estimate
    available : int, optional
        Bytes available; :func:`available_bytes` by default.
    held_already : bool, default=False
        The features are in memory already (counted in ``available``'s complement): only the work must fit.
    where : str, default="memory available"
        What ``available`` is, for the message (``"GPU memory free"``).

    Raises
    ------
    InsufficientMemoryError
        Naming the estimate, the memory available and the alternatives.
    """
    available = available_bytes() if available is None else available
    need = est.peak - (est.held if held_already else 0)
    if need <= available:
        return
    # Rows that would fit, in the same proportion of fitted to held rows.
    fixed = est.work - _per_row(est) * est.n_fit
    per_row = (0 if held_already else est.held / max(est.n, 1)) + _per_row(est) * est.n_fit / max(est.n, 1)
    fitting_rows = int(max(0.0, available - fixed) / max(per_row, 1.0))
    raise InsufficientMemoryError(
        f"{est.describe()} exceeds the {available / _GIB:.1f} GiB of {where}"
        f"{' beyond the features already held' if held_already else ''}; refused before fitting. "
        f"About {fitting_rows:,} training rows would fit. Alternatives: the out-of-core sgd preset "
        "(--classifier sgd --out-of-core: bounded memory at any N), the GPU path (a CUDA device, "
        "FEATX_ARRAY_PATH=cuda, for logreg), PCA preprocessing (--preprocess standard,pca:256 shrinks d), "
        "or a machine with more memory."
    )


def _per_row(est: Estimate) -> float:
    """Working bytes per fitted row (the estimate's slope in n)."""
    fixed = FOOTPRINTS.get(est.preset, FOOTPRINTS[_UNKNOWN]).fixed_mib * _MIB
    return (est.work - fixed) / max(est.n_fit, 1)
