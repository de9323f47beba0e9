"""The extraction engine: a manifest and a backbone in, a finished feature store out.

DataLoader workers decode and resize images to uint8; the main process moves them to the device
(pinned memory, non-blocking copies), normalises there, runs the truncated network under
``inference_mode`` (batch norms folded into their convolutions, autocast and ``channels_last`` where
they pay, ``torch.compile`` for big CPU jobs), and hands each batch to a writer
thread that persists it as one crash-safe part of the store. Memory stays flat in the number of
images; an interrupted job resumes from the last written batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featx._env import cache_dir, default_workers, library_versions
from featx._errors import ImageDecodeError, SpecMismatchError, unknown
from featx._imageio import load_for_model
from featx._malloc import reuse_freed_memory
from featx.backbones import (
    DEFAULT_BACKBONE,
    PENULTIMATE,
    Backbone,
    FeatureModel,
    bytes_per_image,
    channels_last_pays,
    feature_dims,
    human_bytes,
    load_backbone,
    resolve_backbone,
)
from featx.data import DEFAULT_TEST_FRACTION, FINGERPRINT_MODES, Manifest, load_source
from featx.distributed import (
    ProcessGroup,
    Shard,
    TorchrunEnv,
    check_agreement,
    join_shards,
    shard_attrs,
    shard_manifest,
    shard_path,
)
from featx.spec import (
    AMP_MODES,
    DECODE_MODES,
    DEFAULT_MAX_PIXELS,
    DTYPES,
    POOLS,
    TTA_MODES,
    ExtractionSpec,
    Preprocessing,
    cache_key,
)
from featx.store import Failure, StoreWriter, check_replaceable, read_key

__all__ = ["COMPILE_MODES", "ExtractionResult", "MaxFailures", "default_store_path", "extract", "resolve_device"]

log = logging.getLogger(__name__)

_NONE_POOL_WARN_BYTES = 64 * 1024  # warn when `--pool none` stores more than this per image

COMPILE_MODES = ("auto", "on", "off")
# With `compile_mode="auto"`, torch.compile is used on these devices from this many images to extract on.
# On 2 CPU cores it takes EfficientNet-Lite0 from 101 to 133 images/s (2.4 ms less per image) but compiling
# takes from seconds (warm inductor cache) to over a minute (cold) (benchmarks/RESULTS.md): 20,000 images
# save ~50 s. No GPU has been measured yet.
_COMPILE_AUTO_MIN_IMAGES = {"cpu": 20_000}


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class MaxFailures:
    """How many failed images a job tolerates: a count (``10``) or a share of the images (``1%``)."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str | int | None) -> MaxFailures:
        """``None``/``"inf"`` → unlimited; ``"10"`` → 10 images; ``"2.5%"`` → 2.5 % of the images."""
        if text is None or str(text).strip().lower() in ("inf", "none", "unlimited"):
            return cls()
        raw = str(text).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%", raw)
        if m and float(m.group(1)) <= 100:
            return cls(fraction=float(m.group(1)) / 100)
        if raw.isdigit():
            return cls(count=int(raw))
        raise ValueError(f"max failures {raw!r} must be a count (e.g. 10), a percentage (e.g. 1%) or 'inf'")

    def exceeded(self, failed: int, total: int) -> bool:
        if self.count is not None:
            return failed > self.count
        if self.fraction is not None:
            return failed > self.fraction * total
        return False

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.fraction * 100:g}%" if self.fraction is not None else "inf"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU; explicit devices are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    return dev


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        if device.type != "cuda":
            return "none"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in AMP_MODES:
        raise unknown("amp mode", amp, (*AMP_MODES, "auto"), "Use auto, bf16, fp16 or none.")
    return amp


def default_store_path(key: str, store_dir: str | Path | None = None) -> Path:
    """Where a store goes when no ``out`` is given: ``<store_dir or cache/stores>/<key prefix>.h5``."""
    folder = Path(store_dir).expanduser() if store_dir is not None else cache_dir() / "stores"
    return folder / f"{key[:20]}.h5"


@dataclass
class ExtractionResult:
    """What one call of :func:`extract` did."""

    path: Path
    key: str
    spec: ExtractionSpec
    cached: bool
    n_images: int
    n_done: int
    n_failed: int
    seconds: float
    images_this_run: int = 0
    resumed_rows: int = 0
    device: str = "cpu"
    failures: list[Failure] = field(default_factory=list)
    max_failures: MaxFailures = field(default_factory=MaxFailures)
    dry_run: bool = False
    shard: str | None = None
    rank: int | None = None

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def too_many_failures(self) -> bool:
        """More failed images than ``max_failures`` allows; a shard is never judged alone, only the joined store."""
        return self.shard is None and self.max_failures.exceeded(self.n_failed, self.n_images)


# ------------------------------------------------------------------------------------------- loading
class _ImageRows(Dataset):
    """Decodes manifest rows to uint8 tensors; a bad image yields its reason instead of a tensor."""

    def __init__(
        self, paths: Sequence[str], rows: np.ndarray, pre: Preprocessing, max_pixels: int, decode: str = "exact"
    ) -> None:
        self.paths = paths
        self.rows = rows
        self.pre = pre
        self.max_pixels = max_pixels
        self.decode = decode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        row = int(self.rows[i])
        try:
            return row, load_for_model(self.paths[row], self.pre, self.max_pixels, self.decode), ""
        except ImageDecodeError as exc:
            return row, None, str(exc)
        except Exception as exc:  # never let one file kill the job; record what happened
            return row, None, f"unexpected {type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, torch.Tensor | None, str]]):
    ok = [(row, t) for row, t, _ in items if t is not None]
    failed = [(row, reason) for row, t, reason in items if t is None]
    rows = torch.tensor([r for r, _ in ok], dtype=torch.long)
    images = torch.stack([t for _, t in ok]) if ok else torch.empty(0, dtype=torch.uint8)
    return rows, images, failed


# -------------------------------------------------------------------------------------------- engine
class _Embedder:
    """Normalises uint8 batches on the device and runs the feature model, batch norms folded, with the spec's
    precision."""

    def __init__(
        self,
        model: FeatureModel,
        pre: Preprocessing,
        device: torch.device,
        amp: str,
        tta: str,
        compiled: bool = False,
        batch_size: int = 64,
    ) -> None:
        self.device = device
        self.amp = amp
        self.tta = tta
        self.channels_last = channels_last_pays(device)
        if device.type == "cuda" and amp == "none":
            # float32 means float32: no TF32 matmuls, so a GPU store matches the CPU's numbers.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model = model.with_batchnorm_folded()  # exact to float32 rounding, and 10-15 % faster on the CPU
        self.folded_batchnorms = model.folded_batchnorms
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255.0
        self.batch_size = batch_size
        self.forward = self.model
        self.compiled = compiled
        if compiled:  # the layout probe already ran eagerly, when the copy was folded
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))  # reused across runs
            self.forward = torch.compile(self.model, dynamic=False)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(images)
        if self.compiled and n < self.batch_size:
            # Padding the last batch to the compiled shape costs less than compiling a second graph.
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            out = self._embed(x)
        except Exception as exc:
            if not self.compiled:
                raise
            # Inductor needs a C++ compiler (or Triton) and supports most, not all, models: fall back.
            log.warning("torch.compile failed (%s: %s); extracting eagerly instead", type(exc).__name__, exc)
            self.forward, self.compiled = self.model, False
            out = self._embed(x)
        return {k: v[:n].float().cpu() for k, v in out.items()}

    def _embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.forward(x)
            if self.tta == "flip":
                flipped = self.forward(x.flip(3))
                out = {k: (v + flipped[k]) / 2 for k, v in out.items()}
        return out


def build_spec(
    backbone: Backbone,
    layers: Sequence[str],
    *,
    pool: str = "avg",
    dtype: str = "float32",
    amp: str = "none",
    tta: str = "none",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: str = "exact",
) -> ExtractionSpec:
    """The spec for extracting ``layers`` of a loaded backbone."""
    return ExtractionSpec(
        backbone=backbone.name,
        weights=backbone.weights,
        weights_sha256=backbone.weights_sha256,
        layers=tuple(layers),
        preprocessing=backbone.preprocessing,
        pool=pool,
        dtype=dtype,
        amp=amp,
        tta=tta,
        max_pixels=max_pixels,
        decode=decode,
    )


def _check_options(
    batch_size: int,
    pool: str,
    dtype: str,
    tta: str,
    fingerprint: str,
    workers: int | None,
    max_pixels: int,
    decode: str = "exact",
) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    for kind, value, choices in (
        ("pooling", pool, POOLS),
        ("dtype", dtype, DTYPES),
        ("tta mode", tta, TTA_MODES),
        ("decode mode", decode, DECODE_MODES),
        ("fingerprint mode", fingerprint, FINGERPRINT_MODES),
    ):
        if value not in choices:
            raise unknown(kind, value, choices, f"Choose one of {', '.join(choices)}.")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (decode in the main process) or more, got {workers}")


def extract(
    source: str | Path | Manifest,
    backbone: str = DEFAULT_BACKBONE,
    *,
    layers: Sequence[str] = (PENULTIMATE,),
    pool: str = "avg",
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float32",
    amp: str = "auto",
    tta: str = "none",
    workers: int | None = None,
    max_failures: str | int | None = None,
    overwrite: bool = False,
    fingerprint: str = "stat",
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: str = "exact",
    progress: bool = True,
    expect_weights_sha256: str | None = None,
    store_dir: str | Path | None = None,
    dry_run: bool = False,
    compile_mode: str = "auto",
    shard: str | Shard | None = None,
    distributed: bool = False,
) -> ExtractionResult:
    """Embed every image of a source with a frozen backbone into an HDF5 feature store.

    Re-running with the same inputs is a cache hit that does no model work; an interrupted run
    resumes from the batches already written. Every option is validated before any image is read.

    Parameters
    ----------
    source : str, Path or Manifest
        An image folder, CSV/TSV manifest, ``.txt`` file list, ``digits`` or ``torchvision:NAME``.
    backbone : str, default="featx:efficientnet_lite0"
        ``SOURCE:NAME[.TAG]``; see :mod:`featx.backbones`.
    layers : sequence of str, default=("penultimate",)
        Layers extracted in one pass.
    pool : {"avg", "max", "avgmax", "gem", "none"}, default="avg"
        Pooling of spatial maps (and token sequences).
    out : str or Path, optional
        Store path; by default ``<store_dir>/<key>.h5``.
    batch_size : int, default=64
    device : str, default="auto"
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    dtype : {"float32", "float16"}, default="float32"
        Storage dtype; float16 halves the store.
    amp : {"auto", "bf16", "fp16", "none"}, default="auto"
        Autocast precision; ``auto`` is bf16 (or fp16) on CUDA and none elsewhere.
    tta : {"none", "flip"}, default="none"
        ``flip`` averages the features of each image and its mirror image.
    workers : int, optional
        DataLoader decoding processes; by default one per CPU core (at most 8).
    max_failures : str or int, optional
        Failed images tolerated before :attr:`ExtractionResult.too_many_failures` is set (a count or
        ``"1%"``); the store is written either way.
    overwrite : bool, default=False
        Replace a store (or discard an interrupted job) made with another spec.
    fingerprint : {"stat", "content"}, default="stat"
        How the images enter the cache key: path/size/mtime, or content hashes.
    seed, test_fraction :
        For carving a test split when the source has none.
    max_pixels : int
        Images with more pixels are recorded as failures (decompression-bomb guard).
    decode : {"exact", "fast"}, default="exact"
        ``exact`` decodes and resizes as the weights' own transforms do. ``fast`` decodes JPEGs at a
        reduced DCT scale while the shorter side stays at least the resize size, and resizes only the
        centre-crop region: several times less decoding for photos of a few megapixels, slightly different
        pixels, and so a different store (it is part of the key).
    progress : bool, default=True
        Show a progress bar with images/s and ETA.
    expect_weights_sha256 : str, optional
        Refuse (before reading any image) if the backbone's weights have another checksum, e.g. when
        re-extracting for a trained classifier and the weights behind a tag have changed.
    store_dir : str or Path, optional
        Folder for stores named by their key when ``out`` is not given; by default ``<cache>/stores``.
    dry_run : bool, default=False
        Resolve everything (weights, source, key, path) but extract nothing; the result says whether the
        store is already there (``cached``).
    compile_mode : {"auto", "on", "off"}, default="auto"
        Run the network through ``torch.compile``. Its features match eager float32 within float
        tolerance (tested at 1e-4), not bit for bit, and compiling takes a while, so ``auto`` compiles only
        on a CPU with at least 20,000 images to go. Compiled code is cached in ``<cache>/inductor``.
    shard : str or Shard, optional
        Extract only shard ``"INDEX/COUNT"`` (INDEX from 0) of the manifest's rows into
        ``<out>.shards/``, e.g. to re-run one dead rank alone; join the shards with
        :func:`featx.distributed.join_shards` (``featx join``). The result describes the shard.
    distributed : bool, default=False
        Run as one rank of a ``torchrun`` job (read from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``): every rank
        checks that all computed the same key, extracts its shard (on ``cuda:LOCAL_RANK`` when the device is
        ``auto`` or ``cuda``; ``workers`` defaults to the node's cores divided by its ranks), and rank 0 joins
        the shards into ``out`` after a barrier; only rank 0 shows progress. Rank 0's result describes the
        joined store, the others' their shard. See ``docs/distributed.md``.

    Returns
    -------
    ExtractionResult
    """
    t0 = time.perf_counter()
    if isinstance(layers, str):
        layers = (layers,)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be between 0 and 1, got {test_fraction}")
    _check_options(batch_size, pool, dtype, tta, fingerprint, workers, max_pixels, decode)
    if compile_mode not in COMPILE_MODES:
        raise unknown("compile mode", compile_mode, COMPILE_MODES, f"Choose one of {', '.join(COMPILE_MODES)}.")
    limit = MaxFailures.parse(max_failures)
    env = None
    if distributed:
        if shard is not None:
            raise ValueError(
                "--shard and --distributed exclude each other: under torchrun each rank extracts shard RANK of "
                "WORLD_SIZE; --shard INDEX/COUNT is for running one shard without torchrun"
            )
        env = TorchrunEnv.detect()
        if env is None:
            raise ValueError(
                "distributed extraction needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): launch with "
                "`torchrun --nproc-per-node N -m featx extract ...`, or run one shard with --shard INDEX/COUNT"
            )
        if env.world_size == 1:
            env = None  # one process: an ordinary extraction, no shards
        else:
            device = env.device(device)
            progress = progress and env.rank == 0
    one_shard = Shard.parse(shard) if shard is not None else None
    dev = resolve_device(device)
    amp = _resolve_amp(amp, dev)
    resolve_backbone(backbone)  # cheap name check before loading weights
    net = load_backbone(backbone)
    if expect_weights_sha256 is not None and net.weights_sha256 != expect_weights_sha256:
        raise SpecMismatchError(
            f"the weights of {net.name} have checksum {net.weights_sha256[:16]}…, not the expected "
            f"{expect_weights_sha256[:16]}…: they changed since the features were made"
        )
    feature_model = net.feature_model(list(layers), pool)  # checks the layers
    # Only now read the source: it may download a dataset or write thousands of PNG files.
    manifest = source if isinstance(source, Manifest) else load_source(source, seed=seed, test_fraction=test_fraction)
    spec = build_spec(net, layers, pool=pool, dtype=dtype, amp=amp, tta=tta, max_pixels=max_pixels, decode=decode)
    fp = manifest.fingerprint(fingerprint)
    key = cache_key(spec, fp)
    path = Path(out).expanduser() if out is not None else default_store_path(key, store_dir)
    job = _Job(
        manifest=manifest,
        spec=spec,
        fingerprint=fp,
        key=key,
        path=path,
        net=net,
        feature_model=feature_model,
        device=dev,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        overwrite=overwrite,
        limit=limit,
        t0=t0,
        compile_mode=compile_mode,
    )
    if env is not None and not dry_run:
        return _extract_distributed(job, env)
    if read_key(path) == key:
        return _cached_result(path, key, spec, manifest, t0, limit)
    if dry_run:  # the plan only: which store, and that it is not there yet
        return ExtractionResult(
            path=path,
            key=key,
            spec=spec,
            cached=False,
            n_images=len(manifest),
            n_done=0,
            n_failed=0,
            seconds=time.perf_counter() - t0,
            max_failures=limit,
            dry_run=True,
        )
    if one_shard is not None:
        check_replaceable(path, key, spec, fp, overwrite)  # refuse before the work, not at the join
        return _extract_shard(job, one_shard)
    return _extract_store(job, path, key, manifest)


@dataclass
class _Job:
    """Everything resolved about one extraction, before any image is read."""

    manifest: Manifest
    spec: ExtractionSpec
    fingerprint: str
    key: str
    path: Path
    net: Backbone
    feature_model: FeatureModel
    device: torch.device
    batch_size: int
    workers: int | None
    progress: bool
    overwrite: bool
    limit: MaxFailures
    t0: float
    compile_mode: str = "auto"


def _extract_store(
    job: _Job, path: Path, key: str, manifest: Manifest, attrs: dict[str, str] | None = None
) -> ExtractionResult:
    """Extract ``manifest`` into the store at ``path`` (resuming, or a cache hit when it is already there)."""
    spec, net, t0, limit = job.spec, job.net, job.t0, job.limit
    if read_key(path) == key:
        return _cached_result(path, key, spec, manifest, t0, limit)
    dims = feature_dims(job.feature_model, net.preprocessing)
    _warn_pool_without_effect(job.feature_model, net.preprocessing, spec.pool)
    if spec.pool == "none" and bytes_per_image(dims, spec.dtype) > _NONE_POOL_WARN_BYTES:
        log.warning(
            "pool 'none' keeps %s per image (%s for %d images); consider avg pooling",
            human_bytes(bytes_per_image(dims, spec.dtype)),
            human_bytes(bytes_per_image(dims, spec.dtype) * len(manifest)),
            len(manifest),
        )
    with StoreWriter(path, spec, key, manifest, job.fingerprint, dims, overwrite=job.overwrite, attrs=attrs) as writer:
        if writer.cached:
            return _cached_result(path, key, spec, manifest, t0, limit)
        resumed = writer.n_done + writer.n_failed
        pending = writer.pending_rows()
        run_start = time.perf_counter()
        engine = _run(job, writer, manifest, pending, resumed)
        seconds = time.perf_counter() - run_start
        stats = {
            "seconds": round(seconds, 3),
            "images_this_run": len(pending),
            "resumed_rows": resumed,
            "images_per_second": round(len(pending) / seconds, 2) if seconds > 0 else None,
            "device": str(job.device),
            "batch_size": job.batch_size,
            **engine,
        }
        writer.finalize(stats)
        failures = [Failure(r, manifest.ids[r], reason) for r, reason in sorted(writer.failed.items())]
        return ExtractionResult(
            path=path,
            key=key,
            spec=spec,
            cached=False,
            n_images=len(manifest),
            n_done=writer.n_done,
            n_failed=writer.n_failed,
            seconds=time.perf_counter() - t0,
            images_this_run=len(pending),
            resumed_rows=resumed,
            device=str(job.device),
            failures=failures,
            max_failures=limit,
        )


def _extract_shard(job: _Job, shard: Shard) -> ExtractionResult:
    """Extract one shard's rows into its own store under ``<out>.shards/``."""
    rows = shard_manifest(job.manifest, shard)
    attrs = shard_attrs(shard, job.key, len(job.manifest))
    result = _extract_store(job, shard_path(job.path, shard), shard.key(job.key), rows, attrs)
    result.shard = str(shard)
    return result


def _on_every_rank(group: ProcessGroup, step: str, path: Path, work):
    """Run ``work()`` on every rank and gather ``(error, value)``, so no rank waits for a rank that failed."""
    own = None
    try:
        value, error = work(), None
    except Exception as exc:
        value, error, own = None, f"{type(exc).__name__}: {exc}", exc
    reports = group.all_gather((error, value))
    if own is not None:
        raise own
    failed = [rank for rank, (err, _) in enumerate(reports) if err is not None]
    if failed:
        shards = ", ".join(f"--shard {Shard(rank, group.env.world_size)}" for rank in failed)
        raise RuntimeError(
            f"{step} failed on "
            + "; ".join(f"rank {rank}: {reports[rank][0]}" for rank in failed)
            + ". Finished shards are kept: fix the problem and re-run the same torchrun command (finished shards "
            f"are reused), or re-run each failed rank alone with the same `featx extract` command plus {shards}, "
            f"then `featx join {path}`"
        )
    return [value for _, value in reports]


def _extract_distributed(job: _Job, env: TorchrunEnv) -> ExtractionResult:
    """One rank of a torchrun job: agree on the key, extract shard RANK, and (rank 0) join after a barrier."""
    shard = Shard(env.rank, env.world_size)
    with ProcessGroup(env, job.device.type) as group:
        mine = {
            "key": job.key,
            "rows": len(job.manifest),
            "path": str(job.path.resolve()),
            "host": socket.gethostname(),
        }
        check_agreement(group.all_gather(mine))
        cached = _on_every_rank(
            group,
            "checking the store",
            job.path,
            lambda: check_replaceable(job.path, job.key, job.spec, job.fingerprint, job.overwrite),
        )
        if all(cached):
            result = _cached_result(job.path, job.key, job.spec, job.manifest, job.t0, job.limit)
            result.rank = env.rank
            return result
        if any(cached):
            seen = [rank for rank, hit in enumerate(cached) if hit]
            raise RuntimeError(
                f"only ranks {seen} see the finished store {job.path}: --out must be on a filesystem that every "
                "node shares"
            )
        runs = _on_every_rank(group, "extraction", job.path, lambda: _extract_shard(job, shard))
    mine_run = runs[env.rank]
    mine_run.rank = env.rank
    if env.rank != 0:
        return mine_run
    joined = join_shards(job.path, count=env.world_size, key=job.key, overwrite=job.overwrite)
    return ExtractionResult(
        path=job.path,
        key=job.key,
        spec=job.spec,
        cached=False,
        n_images=joined.n_images,
        n_done=joined.n_done,
        n_failed=joined.n_failed,
        seconds=time.perf_counter() - job.t0,
        images_this_run=sum(r.images_this_run for r in runs),
        resumed_rows=sum(r.resumed_rows for r in runs),
        device=f"{env.world_size} × {job.device.type}",
        failures=joined.failures,
        max_failures=job.limit,
        rank=env.rank,
    )


def _warn_pool_without_effect(model: FeatureModel, pre: Preprocessing, pool: str) -> None:
    if pool == "avg":
        return
    with torch.inference_mode():
        raw = model.extractor(torch.zeros(1, 3, *pre.input_size))
    vectors = [layer for layer, t in raw.items() if t.ndim == 2]
    if vectors:
        log.warning(
            "pool %r does not change %s: already a pooled vector (penultimate is the network's own pooled "
            "output). To pool the last feature map your way, name that layer (`featx backbones --layers`)",
            pool,
            ", ".join(vectors),
        )


def _cached_result(
    path: Path, key: str, spec: ExtractionSpec, manifest: Manifest, t0: float, limit: MaxFailures
) -> ExtractionResult:
    from featx.store import FeatureStore

    with FeatureStore(path) as store:
        failures = store.failures
        n_done = len(store.rows())
        made_with = json.loads(store.attrs.get("versions", "{}"))
    now = library_versions()
    changed = [f"{k} {made_with.get(k)} → {now[k]}" for k in ("torch", "timm", "pillow") if made_with.get(k) != now[k]]
    if changed:
        log.warning(
            "reusing %s, made with other library versions (%s); if that matters, re-extract with --overwrite",
            path,
            ", ".join(changed),
        )
    return ExtractionResult(
        path=path,
        key=key,
        spec=spec,
        cached=True,
        n_images=len(manifest),
        n_done=n_done,
        n_failed=len(failures),
        seconds=time.perf_counter() - t0,
        failures=failures,
        max_failures=limit,
    )


def _run(job: _Job, writer: StoreWriter, manifest: Manifest, pending: np.ndarray, resumed: int) -> dict:
    """Extract the pending rows of ``manifest`` into ``writer``.

    Returns how the network ran, for the store's stats: ``compiled`` and ``batchnorms_folded``.
    """
    from tqdm.auto import tqdm

    if not len(pending):
        return {"compiled": False, "batchnorms_folded": 0}
    spec, pre, dev, progress = job.spec, job.net.preprocessing, job.device, job.progress
    workers = default_workers() if job.workers is None else job.workers
    loader = DataLoader(
        _ImageRows(manifest.paths, pending, pre, spec.max_pixels, spec.decode),
        batch_size=job.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    compile_model = _compile_wanted(job.compile_mode, dev, len(pending))
    embed = _Embedder(job.feature_model, pre, dev, spec.amp, spec.tta, compile_model, job.batch_size)
    bar = tqdm(
        total=len(manifest),
        initial=resumed,
        unit="img",
        desc="extract",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    # One writer thread: the next batch computes while the last one is saved (at most two in flight).
    in_flight: deque[Future] = deque()
    with (
        reuse_freed_memory(dev.type == "cpu"),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-writer") as pool,
    ):
        try:
            for rows, images, failed in loader:
                feats = embed(images) if len(rows) else {layer: torch.empty(0, d) for layer, d in writer.dims.items()}
                arrays = {k: v.numpy() for k, v in feats.items()}
                in_flight.append(pool.submit(writer.write_batch, rows.numpy(), arrays, failed))
                while len(in_flight) > 2:
                    in_flight.popleft().result()
                bar.update(len(rows) + len(failed))
                if failed:
                    bar.set_postfix(failed=writer.n_failed + len(failed), refresh=False)
        finally:
            # Whatever happens (Ctrl-C included), batches already computed are saved before we leave.
            for fut in in_flight:
                fut.result()
            bar.close()
    return {"compiled": embed.compiled, "batchnorms_folded": embed.folded_batchnorms}


def _compile_wanted(mode: str, dev: torch.device, n_images: int) -> bool:
    if mode != "auto":
        return mode == "on"
    threshold = _COMPILE_AUTO_MIN_IMAGES.get(dev.type)
    return threshold is not None and n_images >= threshold
