"""The extraction engine: a manifest and a backbone in, a finished feature store out.

DataLoader workers decode and resize images to uint8; the main process moves them to the device
(pinned memory, non-blocking copies), normalises there, runs the truncated network under
``inference_mode`` (batch norms folded into their convolutions, autocast and ``channels_last`` where
they pay, ``torch.compile`` for big CPU jobs), and hands each batch to a writer
thread that persists it as one crash-safe part of the store. Memory stays flat in the number of
images; an interrupted job resumes from the last written batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featx._runtime.device import autocast, channels_last_pays, exact_float32
from featx._runtime.env import cache_dir, default_workers, library_versions, temporary_attr, temporary_environ
from featx._runtime.malloc import reuse_freed_memory
from featx._runtime.progress import Progress
from featx.backbones.features import Backbone, FeatureModel, bytes_per_image, feature_dims, human_bytes
from featx.data.imageio import load_for_model
from featx.data.manifest import Manifest
from featx.exceptions import ImageDecodeError
from featx.extract.device_decode import DeviceDecoder, read_for_device
from featx.spec import COMPILE_MODES, ExtractionSpec, Preprocessing
from featx.store.format import Failure, read_key
from featx.store.writer import StoreWriter

__all__ = ["COMPILE_MODES", "ExtractionResult", "MaxFailures", "default_batch_size"]

log = logging.getLogger(__name__)


_NONE_POOL_WARN_BYTES = 64 * 1024  # warn when `--pool none` stores more than this per image


# With `compile_mode="auto"`, torch.compile is used on these devices from this many images to extract on.
# On 2 CPU cores it takes EfficientNet-Lite0 from 101 to 133 images/s (2.4 ms less per image) but compiling
# takes from seconds (warm inductor cache) to over a minute (cold) (benchmarks/RESULTS.md): 20,000 images
# save ~50 s. No GPU has been measured yet.
_COMPILE_AUTO_MIN_IMAGES = {"cpu": 20_000}

# Images per forward pass when none is asked for: a GPU idles between small batches (each costs launches, a
# copy and a sync), a CPU gains nothing from big ones and holds more memory.
_DEFAULT_BATCH_SIZE = {"cuda": 256}


def default_batch_size(device: torch.device) -> int:
    """The batch size :func:`~featx.extract.extract` uses on ``device`` when none is given: 256 on CUDA, else 64."""
    return _DEFAULT_BATCH_SIZE.get(device.type, 64)


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
    #: The fingerprint of the labels and source splits a found store holds once the call returns (the source's;
    #: in a dry run, those a real run would write), so a plan can tell a relabelled source without writing.
    labels_fingerprint: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def too_many_failures(self) -> bool:
        """More failed images than ``max_failures`` allows; a shard is never judged alone, only the joined store."""
        return self.shard is None and self.max_failures.exceeded(self.n_failed, self.n_images)


# ------------------------------------------------------------------------------------------- loading
@dataclass(eq=False)
class _ImageRows(Dataset):
    """Decodes manifest rows to uint8 tensors; a bad image yields its reason instead of a tensor."""

    paths: Sequence[str]
    rows: np.ndarray
    pre: Preprocessing
    max_pixels: int
    decode: str = "exact"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        row = int(self.rows[i])
        try:
            if self.decode == "device":  # a JPEG's bytes, for the device; any other file decoded here, exactly
                return row, read_for_device(self.paths[row], self.pre, self.max_pixels), ""
            return row, load_for_model(self.paths[row], self.pre, self.max_pixels, self.decode), ""
        except ImageDecodeError as exc:
            return row, None, str(exc)
        except Exception as exc:  # never let one file kill the job; record what happened
            return row, None, f"unexpected {type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, torch.Tensor | None, str]]):
    """``(rows, images, failed, encoded rows, encoded)``: decoded ``[3, H, W]`` crops are stacked, the bytes of
    JPEGs left to the device (1-D, ``decode="device"``) are kept apart."""
    ok = [(row, t) for row, t, _ in items if t is not None and t.ndim == 3]
    encoded = [(row, t) for row, t, _ in items if t is not None and t.ndim == 1]
    failed = [(row, reason) for row, t, reason in items if t is None]
    rows = torch.tensor([r for r, _ in ok], dtype=torch.long)
    images = torch.stack([t for _, t in ok]) if ok else torch.empty(0, dtype=torch.uint8)
    return rows, images, failed, [r for r, _ in encoded], [t for _, t in encoded]


def _on_device(
    decoder: DeviceDecoder, batch: tuple, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """A collated batch with its JPEG bytes decoded on ``device``: ``(rows, images, failed)``, images there."""
    rows, images, failed, encoded_rows, encoded = batch
    if not encoded:
        return rows, images, failed
    done, crops, refused = decoder(encoded_rows, encoded)
    if not done:
        return rows, images, failed + refused
    parts = [images.to(device, non_blocking=True)] if len(rows) else []
    rows = torch.cat([rows, torch.tensor(done, dtype=torch.long)])
    return rows, torch.cat([*parts, torch.stack(crops)]), failed + refused


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
        # On CUDA the copy back is asynchronous (into pinned memory): the next batch is decoded and queued while
        # this one computes, and the writer thread waits for the copy (_write), never the device loop.
        cuda = self.device.type == "cuda"
        return {k: v[:n].float().to("cpu", non_blocking=cuda) for k, v in out.items()}

    def _embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), autocast(self.device, self.amp):
            out = self.forward(x)
            if self.tta == "flip":
                flipped = self.forward(x.flip(3))
                out = {k: (v + flipped[k]) / 2 for k, v in out.items()}
        return out


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
    spec, net = job.spec, job.net
    if read_key(path) == key:
        return _cached_result(job, path, key, manifest)
    dims = feature_dims(job.feature_model, net.preprocessing)
    _warn_pool_without_effect(job.feature_model, net.preprocessing, spec.pool)  # some layers (all: see extract)
    if spec.pool == "none" and bytes_per_image(dims, spec.dtype) > _NONE_POOL_WARN_BYTES:
        log.warning(
            "pool 'none' keeps %s per image (%s for %d images); consider avg pooling",
            human_bytes(bytes_per_image(dims, spec.dtype)),
            human_bytes(bytes_per_image(dims, spec.dtype) * len(manifest)),
            len(manifest),
        )
    with StoreWriter(path, spec, key, manifest, job.fingerprint, dims, overwrite=job.overwrite, attrs=attrs) as writer:
        if writer.cached:
            return _cached_result(job, path, key, manifest)
        resumed = writer.n_done + writer.n_failed
        pending = writer.pending_rows()
        run_start = time.perf_counter()
        engine = _run(job, writer, manifest, pending, resumed) if len(pending) else writer.resumed_run
        this_run = time.perf_counter() - run_start
        # Every run's work counts: an interrupted job's saved batches carry what they cost.
        seconds = writer.resumed_seconds + this_run
        stats = {
            "seconds": round(seconds, 3),
            "images": len(manifest),
            "images_this_run": len(pending),
            "seconds_this_run": round(this_run, 3),
            "resumed_rows": resumed,
            "images_per_second": round(len(manifest) / seconds, 2) if seconds > 0 else None,
            "device": str(job.device),
            "batch_size": job.batch_size,
            "compiled": bool(engine.get("compiled", False)),
            "batchnorms_folded": int(engine.get("batchnorms_folded", 0)),
        }
        writer.finalize(stats)
        return _result(
            job,
            path,
            key,
            len(manifest),
            cached=False,
            n_done=writer.n_done,
            n_failed=writer.n_failed,
            images_this_run=len(pending),
            resumed_rows=resumed,
            device=str(job.device),
            failures=[Failure(r, manifest.ids[r], reason) for r, reason in sorted(writer.failed.items())],
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
            "output); it pools the other layers. To pool the last feature map your way, name that layer "
            "(`featx backbones --layers`)",
            pool,
            ", ".join(vectors),
        )


def _result(job: _Job, path: Path, key: str, n_images: int, **fields: Any) -> ExtractionResult:
    """The result of ``job`` for the store at ``path`` (the job's own, or a shard's), timed from the job's start."""
    return ExtractionResult(
        path=path,
        key=key,
        spec=job.spec,
        n_images=n_images,
        seconds=time.perf_counter() - job.t0,
        max_failures=job.limit,
        **fields,
    )


def _cached_result(job: _Job, path: Path, key: str, manifest: Manifest) -> ExtractionResult:
    """The result of finding the complete store ``path`` there already (warning if other libraries made it)."""
    from featx.store.reader import FeatureStore

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
    return _result(
        job,
        path,
        key,
        len(manifest),
        cached=True,
        n_done=n_done,
        n_failed=len(failures),
        failures=failures,
        labels_fingerprint=manifest.labels_fingerprint(),
    )


def _run(job: _Job, writer: StoreWriter, manifest: Manifest, pending: np.ndarray, resumed: int) -> dict:
    """Extract the pending rows of ``manifest`` into ``writer``.

    Returns how the network ran, for the store's stats: ``compiled`` and ``batchnorms_folded``.
    """
    last = time.perf_counter()  # the first batch's seconds include building the loader and the network
    spec, pre, dev, progress = job.spec, job.net.preprocessing, job.device, job.progress
    workers = default_workers() if job.workers is None else job.workers
    loader = DataLoader(
        _ImageRows(manifest.paths, pending, pre, spec.max_pixels, spec.decode),
        batch_size=job.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda" and spec.decode != "device",  # JPEG bytes go to nvJPEG, not to a copy
        prefetch_factor=4 if workers else None,
    )
    compile_model = _compile_wanted(job.compile_mode, dev, len(pending))
    bar = Progress(
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
        exact_float32(dev, spec.amp),
        _inductor_cache(compile_model),
        reuse_freed_memory(dev.type == "cpu"),
        _cudnn_benchmark(dev),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-writer") as pool,
    ):
        embed = _Embedder(job.feature_model, pre, dev, spec.amp, spec.tta, compile_model, job.batch_size)
        decoder = DeviceDecoder(manifest.paths, pre, dev, spec.max_pixels)
        ran = {"compiled": embed.compiled, "batchnorms_folded": embed.folded_batchnorms}
        try:
            for batch in loader:
                rows, images, failed = _on_device(decoder, batch, dev)
                feats = embed(images) if len(rows) else {layer: torch.empty(0, d) for layer, d in writer.dims.items()}
                arrays = {k: v.numpy() for k, v in feats.items()}
                copied = torch.cuda.current_stream(dev).record_event() if dev.type == "cuda" else None
                now = time.perf_counter()
                ran["compiled"] = embed.compiled  # a failed compile falls back to eager on the first batch
                batch_meta = {"seconds": now - last, "run": dict(ran)}
                last = now
                in_flight.append(pool.submit(_write, writer, copied, rows.numpy(), arrays, failed, batch_meta))
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


def _write(writer: StoreWriter, copied: Any, rows: np.ndarray, arrays: dict, failed: list, meta: dict) -> None:
    """The writer thread's task: once the features' copy from the device is done (``copied``), persist the batch
    (``meta``: its ``seconds`` and how the network ``run``)."""
    if copied is not None:
        copied.synchronize()
    writer.write_batch(rows, arrays, failed, **meta)


def _cudnn_benchmark(dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On CUDA, let cuDNN pick its fastest kernels: every batch but the last has the same shape. Restored after."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    return temporary_attr(torch.backends.cudnn, "benchmark", True)


def _inductor_cache(compiled: bool) -> contextlib.AbstractContextManager[None]:
    """Compiled code goes where ``TORCHINDUCTOR_CACHE_DIR`` says, else to ``<cache>/inductor`` (reused across
    runs): set only for the length of the run, so the process's environment is left as it was.

    PyTorch itself sets the variable (to its own default) when ``torch._dynamo`` is first imported, as timm
    does; a variable already set is kept.
    """
    if not compiled:
        return contextlib.nullcontext()
    return temporary_environ("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"), keep_existing=True)


def _compile_wanted(mode: str, dev: torch.device, n_images: int) -> bool:
    if mode != "auto":
        return mode == "on"
    threshold = _COMPILE_AUTO_MIN_IMAGES.get(dev.type)
    return threshold is not None and n_images >= threshold
