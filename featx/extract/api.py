"""The entry point of extraction: :func:`extract` checks every option, resolves the backbone, the source and
the spec into one job (before any image is read), then hands it to the engine (or to a torchrun rank, or one
shard), unless the store is already there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from featx._runtime.device import resolve_amp, resolve_device
from featx._runtime.dist import TorchrunEnv
from featx._runtime.env import cache_dir
from featx._runtime.io import check_writable
from featx.backbones.features import Backbone, FeatureModel
from featx.backbones.loading import load_backbone
from featx.backbones.names import PENULTIMATE, BackboneName, resolve_backbone
from featx.data.manifest import Manifest
from featx.data.sources import load_source
from featx.exceptions import SpecMismatchError
from featx.extract.engine import (
    ExtractionResult,
    MaxFailures,
    _cached_result,
    _extract_store,
    _Job,
    _result,
    default_batch_size,
)
from featx.extract.sharded import Shard, _extract_distributed, _extract_shard
from featx.spec import (
    DEFAULT_AMP,
    DEFAULT_BACKBONE,
    DEFAULT_COMPILE,
    DEFAULT_DECODE,
    DEFAULT_DTYPE,
    DEFAULT_FINGERPRINT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_POOL,
    DEFAULT_TTA,
    ExtractionSpec,
    cache_key,
    check_option,
)
from featx.store.format import partial_path, read_key, shards_path
from featx.store.index import find_store, link_store, remember_store
from featx.store.writer import adopt_legacy_store, check_not_locked, check_replaceable, update_labels

__all__ = ["build_spec", "default_store_path", "effective_pool", "extract"]

log = logging.getLogger(__name__)


def default_store_path(key: str, store_dir: str | Path | None = None) -> Path:
    """Where a store goes when no ``out`` is given: ``<store_dir or cache/stores>/<key prefix>.h5``."""
    folder = Path(store_dir).expanduser() if store_dir is not None else cache_dir() / "stores"
    return folder / f"{key[:20]}.h5"


def build_spec(
    backbone: Backbone,
    layers: Sequence[str],
    *,
    pool: str = DEFAULT_POOL,
    dtype: str = DEFAULT_DTYPE,
    amp: str = "none",
    tta: str = DEFAULT_TTA,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: str = DEFAULT_DECODE,
) -> ExtractionSpec:
    """The spec for extracting ``layers`` of a loaded backbone: what :func:`extract` would record.

    Parameters
    ----------
    backbone : Backbone
        A loaded backbone (:func:`~featx.backbones.load_backbone`); its canonical name, weights tag and
        checksum and preprocessing enter the spec.
    layers : sequence of str
        The layers extracted.
    pool, dtype, tta, max_pixels, decode :
        As for :func:`extract`.
    amp : {"none", "bf16", "fp16"}, default="none"
        The resolved autocast mode (:func:`~featx._runtime.device.resolve_amp` turns ``auto`` into one).

    Returns
    -------
    ExtractionSpec
        Validated by its own constructor.
    """
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
    *,
    batch_size: int | None,
    pool: str,
    dtype: str,
    amp: str,
    tta: str,
    decode: str,
    fingerprint: str,
    compile_mode: str,
    workers: int | None,
    max_pixels: int,
) -> None:
    """Every option of :func:`extract` checked before any weight is loaded or image read."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    for name, value in (
        ("pool", pool),
        ("dtype", dtype),
        ("amp", amp),
        ("tta", tta),
        ("decode", decode),
        ("fingerprint", fingerprint),
        ("compile", compile_mode),
    ):
        check_option(name, value)
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (decode in the main process) or more, got {workers}")


def _torchrun_env(distributed: bool, shard: str | Shard | None) -> TorchrunEnv | None:
    """This rank's place in a torchrun job of several processes, or ``None`` for an ordinary extraction."""
    if not distributed:
        return None
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
    return env if env.world_size > 1 else None  # one process: an ordinary extraction, no shards


def _load_network(
    backbone: str | BackboneName, layers: tuple[str, ...], pool: str, expect_weights_sha256: str | None
) -> tuple[Backbone, FeatureModel]:
    """The backbone (its name checked before any weights are loaded) and its feature model (layers checked)."""
    net = load_backbone(resolve_backbone(backbone))
    if expect_weights_sha256 is not None and net.weights_sha256 != expect_weights_sha256:
        raise SpecMismatchError(
            f"the weights of {net.name} have checksum {net.weights_sha256[:16]}…, not the expected "
            f"{expect_weights_sha256[:16]}…: they changed since the features were made"
        )
    return net, net.feature_model(list(layers), pool)


def effective_pool(net: Backbone, feature_model: FeatureModel, pool: str) -> str:
    """``pool``, or the default pool when every layer is already a pooled vector (``penultimate`` is one).

    Pooling a vector changes nothing, so such a spec is normalised to the default's: the same features make
    the same store (and key) whatever pool was asked for, and the user is told.
    """
    if pool == DEFAULT_POOL:
        return pool
    with torch.inference_mode():
        raw = feature_model.extractor(torch.zeros(1, 3, *net.preprocessing.input_size))
    if not all(t.ndim == 2 for t in raw.values()):
        return pool  # some layer is a map or a sequence: the pool is part of what the store holds
    log.warning(
        "pool %r changes nothing for %s: already a pooled vector (penultimate is the network's own pooled output), "
        "so this is the store of the default pool %r. To pool the last feature map your way, name that layer "
        "(`featx backbones --layers`)",
        pool,
        ", ".join(raw),
        DEFAULT_POOL,
    )
    return DEFAULT_POOL


def _run_job(job: _Job, env: TorchrunEnv | None, shard: Shard | None, dry_run: bool) -> ExtractionResult:
    """Do what the resolved job asks: a torchrun rank, a cache hit, the plan only, one shard, or the store."""
    if env is not None and not dry_run:
        return _extract_distributed(job, env)
    if not dry_run and job.path.is_file() and read_key(job.path) not in (None, job.key):
        adopt_legacy_store(job.path, job.key, job.spec, job.fingerprint)
    if read_key(job.path) != job.key and shard is None:
        found = _found_elsewhere(job, dry_run)
        if found is not None and dry_run:
            return _cached_result(job, found, job.key, job.manifest)
    if read_key(job.path) == job.key:
        if not dry_run:
            update_labels(job.path, job.manifest)  # same images, perhaps new labels: a cheap rewrite, no extraction
            remember_store(job.path, job.key)
        return _cached_result(job, job.path, job.key, job.manifest)
    if dry_run:  # the plan only: which store, and that it is not there yet
        return _result(job, job.path, job.key, len(job.manifest), cached=False, n_done=0, n_failed=0, dry_run=True)
    if shard is not None:
        check_replaceable(job.path, job.key, job.spec, job.fingerprint, job.overwrite)  # refuse before the work
        return _extract_shard(job, shard)
    result = _extract_store(job, job.path, job.key, job.manifest)
    remember_store(job.path, job.key)
    return result


def _found_elsewhere(job: _Job, dry_run: bool) -> Path | None:
    """A complete store of the job's key at another path, put at the job's path (unless ``dry_run``).

    Only where nothing is at the job's path yet (no store, no unfinished work): a store there is replaced or
    resumed as always.
    """
    if job.path.exists() or partial_path(job.path).exists() or shards_path(job.path).exists():
        return None
    found = find_store(job.key, besides=job.path)
    if found is None or dry_run:
        return found
    how = link_store(found, job.path)
    log.info("%s holds the same features (key %s): %s to %s instead of extracting", found, job.key[:12], how, job.path)
    return found


def extract(
    source: str | Path | Manifest,
    backbone: str | BackboneName = DEFAULT_BACKBONE,
    *,
    layers: Sequence[str] = (PENULTIMATE,),
    pool: str = DEFAULT_POOL,
    out: str | Path | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = DEFAULT_DTYPE,
    amp: str = DEFAULT_AMP,
    tta: str = DEFAULT_TTA,
    workers: int | None = None,
    max_failures: str | int | None = None,
    overwrite: bool = False,
    fingerprint: str = DEFAULT_FINGERPRINT,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: str = DEFAULT_DECODE,
    progress: bool = True,
    expect_weights_sha256: str | None = None,
    store_dir: str | Path | None = None,
    dry_run: bool = False,
    compile_mode: str = DEFAULT_COMPILE,
    shard: str | Shard | None = None,
    distributed: bool = False,
) -> ExtractionResult:
    """Embed every image of a source with a frozen backbone into an HDF5 feature store.

    Re-running with the same inputs is a cache hit that does no model work; an interrupted run
    resumes from the batches already written. Every option is validated before any image is read. The store
    is keyed by the images and the spec only: the same images with new labels (a relabelled CSV) are a cache
    hit whose labels are rewritten, and train / val / test are carved when the store is read (a split plan).

    Parameters
    ----------
    source : str, Path or Manifest
        An image folder, CSV/TSV manifest, ``.txt`` file list, ``digits`` or ``torchvision:NAME``.
    backbone : str or BackboneName, default="featx:efficientnet_lite0"
        ``SOURCE:NAME[.TAG]`` (see :mod:`featx.backbones`), or a name parsed or resolved before.
    layers : sequence of str, default=("penultimate",)
        Layers extracted in one pass.
    pool : {"avg", "max", "avgmax", "gem", "none"}, default="avg"
        Pooling of spatial maps (and token sequences).
    out : str or Path, optional
        Store path; by default ``<store_dir>/<key>.h5``.
    batch_size : int, optional
        Images per forward pass; by default 256 on CUDA (a GPU needs big batches to stay busy), else 64.
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
    max_pixels : int
        Images with more pixels are recorded as failures (decompression-bomb guard).
    decode : {"exact", "fast", "device"}, default="exact"
        ``exact`` decodes and resizes as the weights' own transforms do. ``fast`` decodes JPEGs at a
        reduced DCT scale while the shorter side stays at least the resize size, and resizes only the
        centre-crop region: several times less decoding for photos of a few megapixels, slightly different
        pixels, and so a different store (it is part of the key). ``device`` leaves the workers only reading
        files: JPEGs are decoded (nvJPEG on CUDA), resized and cropped in batches on ``device``; other files,
        and JPEGs it cannot vouch for (CMYK, greyscale, EXIF-rotated, truncated), are decoded exactly on the
        CPU, so a bad image fails as it does with ``exact``. Also a store of its own.
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
        on a CPU with at least 20,000 images to go. Compiled code is cached where ``TORCHINDUCTOR_CACHE_DIR``
        says (PyTorch sets it to its own default once timm is imported), else in ``<cache>/inductor``.
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
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    options = {"pool": pool, "dtype": dtype, "tta": tta, "decode": decode, "max_pixels": max_pixels}
    _check_options(
        batch_size=batch_size,
        amp=amp,
        fingerprint=fingerprint,
        compile_mode=compile_mode,
        workers=workers,
        **options,
    )
    limit = MaxFailures.parse(max_failures)
    env = _torchrun_env(distributed, shard)
    if env is not None:
        device, progress = env.device(device), progress and env.rank == 0  # only rank 0 shows progress
    one_shard = Shard.parse(shard) if shard is not None else None
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    if out is not None and not dry_run:  # before the network loads: a folder that cannot take the store fails now
        check_writable(Path(out).expanduser().parent, "the folder of --out")
    if out is not None and env is None and one_shard is None and not dry_run:
        check_not_locked(Path(out).expanduser())  # a second writer is refused now, not after the model loads
    net, feature_model = _load_network(backbone, layers, pool, expect_weights_sha256)
    if (pooled := effective_pool(net, feature_model, pool)) != pool:
        options["pool"], feature_model = pooled, net.feature_model(list(layers), pooled)
    # Only now read the source: it may download a dataset or write thousands of PNG files.
    manifest = source if isinstance(source, Manifest) else load_source(source)
    spec = build_spec(net, layers, amp=amp, **options)
    fp = manifest.images_fingerprint(fingerprint)  # the images only: labels and splits are not in the key
    key = cache_key(spec, fp)
    job = _Job(
        manifest=manifest,
        spec=spec,
        fingerprint=fp,
        key=key,
        path=Path(out).expanduser() if out is not None else default_store_path(key, store_dir),
        net=net,
        feature_model=feature_model,
        device=dev,
        batch_size=batch_size or default_batch_size(dev),
        workers=workers,
        progress=progress,
        overwrite=overwrite,
        limit=limit,
        t0=t0,
        compile_mode=compile_mode,
    )
    return _run_job(job, env, one_shard, dry_run)
