"""The entry point of extraction: :func:`extract` checks every option, resolves the backbone, the source and
the spec into one job (before any image is read), then hands it to the engine (or to a torchrun rank, or one
shard), unless the store is already there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from featx._runtime.device import resolve_amp, resolve_device
from featx._runtime.dist import TorchrunEnv
from featx._runtime.env import cache_dir
from featx._runtime.io import check_writable
from featx._runtime.params import config_from
from featx.backbones.features import Backbone, FeatureModel
from featx.backbones.loading import load_backbone
from featx.backbones.names import PENULTIMATE, BackboneName, resolve_backbone
from featx.data.manifest import Manifest
from featx.data.sources import load_source
from featx.exceptions import SpecMismatchError
from featx.extract.engine import (
    ExtractionJob,
    ExtractionResult,
    MaxFailures,
    cached_result,
    default_batch_size,
    extract_store,
    job_result,
)
from featx.extract.sharded import Shard, extract_distributed, extract_shard
from featx.spec import DEFAULT_BACKBONE, DEFAULT_POOL, SPEC_OPTIONS, ExtractionOptions, ExtractionSpec, cache_key
from featx.store.format import partial_path, read_format_version, read_key, shards_path
from featx.store.index import find_store, link_store, remember_store
from featx.store.writer import check_not_locked, check_replaceable, migrate_format_1, update_labels

__all__ = ["build_spec", "default_store_path", "effective_pool", "extract"]

log = logging.getLogger(__name__)


def default_store_path(key: str, store_dir: str | Path | None = None) -> Path:
    """Where a store goes when no ``out`` is given: ``<store_dir or cache/stores>/<key prefix>.h5``."""
    folder = Path(store_dir).expanduser() if store_dir is not None else cache_dir() / "stores"
    return folder / f"{key[:20]}.h5"


def build_spec(
    backbone: Backbone, layers: Sequence[str], options: ExtractionOptions | None = None, *, amp: str = "none"
) -> ExtractionSpec:
    """The spec for extracting ``layers`` of a loaded backbone: what :func:`extract` would record.

    Parameters
    ----------
    backbone : Backbone
        A loaded backbone (:func:`~featx.backbones.load_backbone`); its canonical name, weights tag and
        checksum and preprocessing enter the spec.
    layers : sequence of str
        The layers extracted.
    options : ExtractionOptions, optional
        The options; those of :data:`~featx.spec.SPEC_OPTIONS` enter the spec. By default the table's defaults.
    amp : {"none", "bf16", "fp16"}, default="none"
        The resolved autocast mode, recorded instead of ``options.amp`` (which may be ``auto``:
        :func:`~featx._runtime.device.resolve_amp` turns it into one of these).

    Returns
    -------
    ExtractionSpec
        Validated by its own constructor.
    """
    options = ExtractionOptions() if options is None else options
    return ExtractionSpec(
        backbone=backbone.name,
        weights=backbone.weights,
        weights_sha256=backbone.weights_sha256,
        layers=tuple(layers),
        preprocessing=backbone.preprocessing,
        **{**{name: getattr(options, name) for name in SPEC_OPTIONS}, "amp": amp},
    )


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


def _run_job(job: ExtractionJob, env: TorchrunEnv | None, shard: Shard | None, dry_run: bool) -> ExtractionResult:
    """Do what the resolved job asks: a torchrun rank, a cache hit, the plan only, one shard, or the store."""
    if env is not None and not dry_run:
        return extract_distributed(job, env)
    if not dry_run and job.path.is_file() and read_format_version(job.path) == 1:
        migrate_format_1(job.path, job.key, job.spec, job.fingerprint)
    if read_key(job.path) != job.key and shard is None:
        found = _found_elsewhere(job, dry_run)
        if found is not None and dry_run:
            return cached_result(job, found, job.key, job.manifest)
    if read_key(job.path) == job.key:
        if not dry_run:
            update_labels(job.path, job.manifest)  # same images, perhaps new labels: a cheap rewrite, no extraction
            remember_store(job.path, job.key)
        return cached_result(job, job.path, job.key, job.manifest)
    if dry_run:  # the plan only: which store, and that it is not there yet
        return job_result(job, job.path, job.key, len(job.manifest), cached=False, n_done=0, n_failed=0, dry_run=True)
    if shard is not None:
        check_replaceable(job.path, job.key, job.spec, job.fingerprint, job.overwrite)  # refuse before the work
        return extract_shard(job, shard)
    result = extract_store(job, job.path, job.key, job.manifest)
    remember_store(job.path, job.key)
    return result


def _found_elsewhere(job: ExtractionJob, dry_run: bool) -> Path | None:
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
    options: ExtractionOptions | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    max_failures: str | int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    expect_weights_sha256: str | None = None,
    store_dir: str | Path | None = None,
    dry_run: bool = False,
    shard: str | Shard | None = None,
    distributed: bool = False,
    **option_values: Any,
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
    options : ExtractionOptions, optional
        How to extract: pooling, storage dtype, precision, test-time augmentation, decoding, the pixel limit,
        the fingerprint mode, compilation, batch size and workers (:class:`~featx.spec.ExtractionOptions`
        describes each). By default the table's defaults.
    out : str or Path, optional
        Store path; by default ``<store_dir>/<key>.h5``.
    device : str, default="auto"
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    max_failures : str or int, optional
        Failed images tolerated before :attr:`ExtractionResult.too_many_failures` is set (a count or
        ``"1%"``); the store is written either way.
    overwrite : bool, default=False
        Replace a store (or discard an interrupted job) made with another spec.
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
    shard : str or Shard, optional
        Extract only shard ``"INDEX/COUNT"`` (INDEX from 0) of the manifest's rows into
        ``<out>.shards/``, e.g. to re-run one dead rank alone; join the shards with
        :func:`featx.extract.sharded.join_shards` (``featx join``). The result describes the shard.
    distributed : bool, default=False
        Run as one rank of a ``torchrun`` job (read from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``): every rank
        checks that all computed the same key, extracts its shard (on ``cuda:LOCAL_RANK`` when the device is
        ``auto`` or ``cuda``; ``workers`` defaults to the node's cores divided by its ranks), and rank 0 joins
        the shards into ``out`` after a barrier; only rank 0 shows progress. Rank 0's result describes the
        joined store, the others' their shard. See ``docs/distributed.md``.
    **option_values
        Any option of :class:`~featx.spec.ExtractionOptions` by its name, for short calls: ``extract(src,
        pool="max")`` is ``extract(src, options=ExtractionOptions(pool="max"))``; with ``options`` too, they
        replace those of ``options``. Any other name is a ``TypeError``.

    Returns
    -------
    ExtractionResult

    Examples
    --------
    >>> from featx.spec import ExtractionOptions
    >>> half = ExtractionOptions(pool="gem", dtype="float16")
    >>> extract("photos/", "timm:convnext_tiny", layers=["stages.3"], options=half)  # doctest: +SKIP
    >>> extract("photos/", pool="max", workers=0)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    # Every option checked by its table, before any weight is loaded or image read.
    options = config_from(ExtractionOptions, options, option_values, extract)
    limit = MaxFailures.parse(max_failures)
    env = _torchrun_env(distributed, shard)
    if env is not None:
        device, progress = env.device(device), progress and env.rank == 0  # only rank 0 shows progress
    one_shard = Shard.parse(shard) if shard is not None else None
    dev = resolve_device(device)
    amp = resolve_amp(options.amp, dev)
    if out is not None and not dry_run:  # before the network loads: a folder that cannot take the store fails now
        check_writable(Path(out).expanduser().parent, "the folder of --out")
    if out is not None and env is None and one_shard is None and not dry_run:
        check_not_locked(Path(out).expanduser())  # a second writer is refused now, not after the model loads
    net, feature_model = _load_network(backbone, layers, options.pool, expect_weights_sha256)
    if (pooled := effective_pool(net, feature_model, options.pool)) != options.pool:
        options, feature_model = dataclasses.replace(options, pool=pooled), net.feature_model(list(layers), pooled)
    # Only now read the source: it may download a dataset or write thousands of PNG files.
    manifest = source if isinstance(source, Manifest) else load_source(source)
    spec = build_spec(net, layers, options, amp=amp)
    fp = manifest.images_fingerprint(options.fingerprint)  # the images only: labels and splits are not in the key
    key = cache_key(spec, fp)
    job = ExtractionJob(
        manifest=manifest,
        spec=spec,
        fingerprint=fp,
        key=key,
        path=Path(out).expanduser() if out is not None else default_store_path(key, store_dir),
        net=net,
        feature_model=feature_model,
        device=dev,
        batch_size=options.batch_size or default_batch_size(dev),
        workers=options.workers,
        progress=progress,
        overwrite=overwrite,
        limit=limit,
        t0=t0,
        compile_mode=options.compile_mode,
    )
    return _run_job(job, env, one_shard, dry_run)
