"""The extraction spec: the one frozen description of how features were made.

:class:`ExtractionSpec` is the single source for the store's cache key, its HDF5 provenance
attributes and the command-line defaults. Every field that changes the numbers in a store is a
field here; fields that do not (batch size, worker count, memory layout) are deliberately absent so
that changing them reuses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from featx._runtime.params import INT32_MAX, Choices, Interval, check_options, check_value, option, options_of
from featx.exceptions import unknown

__all__ = [
    "AMP_CHOICES",
    "AMP_MODES",
    "COMPILE_MODES",
    "DECODE_MODES",
    "DEFAULT_AMP",
    "DEFAULT_BACKBONE",
    "DEFAULT_COMPILE",
    "DEFAULT_DECODE",
    "DEFAULT_DTYPE",
    "DEFAULT_FINGERPRINT",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_POOL",
    "DEFAULT_TTA",
    "DTYPES",
    "EXTRACTOR_VERSION",
    "FINGERPRINT_MODES",
    "INTERPOLATIONS",
    "OPTIONS",
    "POOLS",
    "SPEC_OPTIONS",
    "TTA_MODES",
    "ExtractionOptions",
    "ExtractionSpec",
    "Option",
    "Preprocessing",
    "cache_key",
    "canonical_json",
    "check_option",
    "spec_differences",
    "with_defaults",
]

#: Bumped whenever a code change alters the numbers extraction produces (decoding, resizing, pooling).
#: It is part of every cache key, so stores made by older code are never silently reused.
EXTRACTOR_VERSION = 1

#: The offline built-in backbone, used when none is named.
DEFAULT_BACKBONE = "featx:efficientnet_lite0"

#: Images above this many pixels are refused before decoding (decompression-bomb guard; Pillow's own limit).
DEFAULT_MAX_PIXELS = 89_478_485

# The choices of every extraction option; :class:`ExtractionOptions` is their table.
POOLS = ("avg", "max", "avgmax", "gem", "none")
DTYPES = ("float32", "float16")
#: Autocast precisions a spec records (``auto`` is resolved against the device before a spec is built).
AMP_MODES = ("none", "bf16", "fp16")
#: What a caller may ask for: ``auto`` is bf16 (else fp16) on CUDA and none elsewhere.
AMP_CHOICES = ("auto", *AMP_MODES)
TTA_MODES = ("none", "flip")
#: ``device`` (JPEGs decoded on the extraction device) came after ``fast``; each has a key of its own.
DECODE_MODES = ("exact", "fast", "device")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
#: How images enter the cache key: path, size and mtime (``stat``) or content hashes.
FINGERPRINT_MODES = ("stat", "content")
#: ``torch.compile`` of the network; ``auto`` compiles CPU jobs big enough to repay the compile time.
COMPILE_MODES = ("auto", "on", "off")

DEFAULT_POOL = "avg"
DEFAULT_DTYPE = "float32"
DEFAULT_AMP = "auto"
DEFAULT_TTA = "none"
DEFAULT_DECODE = "exact"
DEFAULT_FINGERPRINT = "stat"
DEFAULT_COMPILE = "auto"


@dataclass(frozen=True)
class ExtractionOptions:
    """The options a user sets for an extraction: the user-facing half of :class:`ExtractionSpec` (pooling,
    storage, precision, decoding, the pixel limit: :data:`SPEC_OPTIONS`) and how the run goes (batch size,
    workers, fingerprint, compilation). Each field is one row of the option table (allowed values, default,
    help): ``featx extract``'s options, a pipeline's ``[[backbones]]`` keys, :func:`featx.extract.extract`'s
    ``options`` (and its keyword arguments of the same names) all come from it, and building one checks every
    option once.

    Parameters
    ----------
    pool : {"avg", "max", "avgmax", "gem", "none"}, default="avg"
        Pooling of spatial maps (and token sequences).
    dtype : {"float32", "float16"}, default="float32"
        Storage dtype; float16 halves the store.
    amp : {"auto", "bf16", "fp16", "none"}, default="auto"
        Autocast precision; ``auto`` is bf16 (or fp16) on CUDA and none elsewhere.
    tta : {"none", "flip"}, default="none"
        ``flip`` averages the features of each image and its mirror image.
    decode : {"exact", "fast", "device"}, default="exact"
        ``exact`` decodes and resizes as the weights' own transforms do. ``fast`` decodes JPEGs at a
        reduced DCT scale while the shorter side stays at least the resize size, and resizes only the
        centre-crop region: several times less decoding for photos of a few megapixels, slightly different
        pixels, and so a different store (it is part of the key). ``device`` leaves the workers only reading
        files: JPEGs are decoded (nvJPEG on CUDA), resized and cropped in batches on the extraction device;
        other files, and JPEGs it cannot vouch for (CMYK, greyscale, EXIF-rotated, truncated), are decoded
        exactly on the CPU, so a bad image fails as it does with ``exact``. Also a store of its own.
    max_pixels : int, default=89_478_485
        Images with more pixels are recorded as failures (decompression-bomb guard).
    fingerprint : {"stat", "content"}, default="stat"
        How the images enter the cache key: path/size/mtime, or content hashes.
    compile_mode : {"auto", "on", "off"}, default="auto"
        Run the network through ``torch.compile``. Its features match eager float32 within float
        tolerance (tested at 1e-4), not bit for bit, and compiling takes a while, so ``auto`` compiles only
        on a CPU with at least 20,000 images to go. Compiled code is cached where ``TORCHINDUCTOR_CACHE_DIR``
        says (PyTorch sets it to its own default once timm is imported), else in ``<cache>/inductor``.
    batch_size : int, optional
        Images per forward pass; by default 256 on CUDA (a GPU needs big batches to stay busy), else 64.
    workers : int, optional
        DataLoader decoding processes; by default one per CPU core (at most 8).

    Examples
    --------
    >>> ExtractionOptions(pool="gem").pool
    'gem'
    >>> ExtractionOptions(pool="mean")
    Traceback (most recent call last):
    ...
    featx.exceptions.UnknownOptionError: unknown pool 'mean'. Choose one of avg, max, avgmax, gem, none.
    """

    pool: str = option(DEFAULT_POOL, Choices(POOLS), help="Pooling of spatial feature maps (and token sequences).")
    dtype: str = option(DEFAULT_DTYPE, Choices(DTYPES), help="Storage dtype of the features.")
    amp: str = option(
        DEFAULT_AMP,
        Choices(AMP_CHOICES),
        help="Autocast precision (auto: bf16/fp16 on CUDA, none on CPU).",
        pipeline=False,  # a pipeline's device decides it
    )
    tta: str = option(
        DEFAULT_TTA,
        Choices(TTA_MODES),
        help="Test-time augmentation: flip averages the features of each image and its mirror.",
    )
    decode: str = option(
        DEFAULT_DECODE,
        Choices(DECODE_MODES),
        help="fast: big JPEGs at reduced scale, crop region resized; device: JPEGs decoded on --device. Pixels differ.",
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        Interval(True, 1),
        help="Images with more pixels, decoded or once resized, are recorded as failures (decompression-bomb guard).",
        pipeline=False,
    )
    fingerprint: str = option(
        DEFAULT_FINGERPRINT,
        Choices(FINGERPRINT_MODES),
        help="How images enter the cache key: path/size/mtime, or content hashes.",
        label="fingerprint mode",
        pipeline=False,
    )
    compile_mode: str = option(
        DEFAULT_COMPILE,
        Choices(COMPILE_MODES),
        help="torch.compile the network (features within float tolerance of eager); auto: CPU jobs of 20,000+ images.",
        flags=("--compile", "compile_mode"),
        label="compile mode",
        pipeline=False,
    )
    batch_size: int | None = option(
        None,
        None,
        Interval(True, 1, INT32_MAX),
        help="Images per forward pass [default: 256 on CUDA, else 64].",
        show_default=False,
    )
    workers: int | None = option(
        None,
        None,
        Interval(True, 0),
        help="Decoding processes [default: CPU cores, max 8].",
        show_default=False,
        pipeline=False,  # the job's, for every table
    )

    def __post_init__(self) -> None:
        check_options(self)  # every option against its table, once


class Option(NamedTuple):
    """One extraction option with fixed choices: how messages name it, its choices and its default."""

    label: str
    choices: tuple[str, ...]
    default: str | None


def _choice_options() -> dict[str, Option]:
    """The options of :class:`ExtractionOptions` with a fixed set of choices, under the names users type."""
    out = {}
    for name, (spec, default) in options_of(ExtractionOptions).items():
        choices = [c for c in spec.allowed if isinstance(c, Choices)]
        if choices:
            out["compile" if name == "compile_mode" else name] = Option(spec.label or name, choices[0].values, default)
    return out


#: Every extraction option with a fixed set of choices (from :class:`ExtractionOptions`'s table), by the name
#: users type it under, and the preprocessing's interpolation.
OPTIONS: Mapping[str, Option] = MappingProxyType(
    {**_choice_options(), "interpolation": Option("interpolation", INTERPOLATIONS, None)}
)

# Fields added after stores existed, left out of the spec's dict (and so its key) at their default value:
# every store made before a field existed keeps its key, and reads back with the default.
_OMITTED_AT_DEFAULT = {"decode": DEFAULT_DECODE}


def check_option(name: str, value: Any, choices: Sequence[str] | None = None) -> str:
    """The one check of an extraction option's value; returns the value.

    Parameters
    ----------
    name : str
        A key of :data:`OPTIONS` (``pool``, ``dtype``, ``amp``, ``tta``, ``decode``, ``interpolation``,
        ``fingerprint``, ``compile``).
    value : str
        The value given.
    choices : sequence of str, optional
        A narrower set than the option's own, where a context allows fewer (a spec records a resolved
        ``amp``, never ``auto``).

    Returns
    -------
    str
        ``value``, unchanged.

    Raises
    ------
    UnknownNameError
        If ``value`` is not one of the choices: the message names the value, the close matches and every choice,
        e.g. ``unknown pool 'mean'. Choose one of avg, max, avgmax, gem, none.``

    Examples
    --------
    >>> check_option("pool", "gem")
    'gem'
    """
    option = OPTIONS[name]
    allowed = tuple(option.choices if choices is None else choices)
    if not isinstance(value, str) or value not in allowed:
        raise unknown(option.label, str(value), allowed, f"Choose one of {', '.join(allowed)}.")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    Parameters
    ----------
    input_size : tuple of int
        ``(height, width)`` of the centre crop fed to the network.
    resize_size : int
        The shorter image side is resized to this before the centre crop.
    interpolation : str
        One of ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``.
    mean, std : tuple of float
        Per-channel normalisation applied to pixels scaled to ``[0, 1]``.
    """

    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        check_option("interpolation", self.interpolation)
        if min(self.input_size) < 1 or self.resize_size < min(self.input_size):
            raise ValueError(
                f"resize_size {self.resize_size} must be at least the crop {self.input_size}; "
                "the crop is taken from the resized image"
            )

    @classmethod
    def from_crop_pct(
        cls,
        input_size: tuple[int, int],
        crop_pct: float,
        interpolation: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> Preprocessing:
        """Build from timm-style metadata: resize the shorter side to ``input / crop_pct``, then crop."""
        import math

        resize = math.floor(min(input_size) / crop_pct)
        return cls(
            input_size=(int(input_size[0]), int(input_size[1])),
            resize_size=int(resize),
            interpolation=interpolation,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
        )


@dataclass(frozen=True)
class ExtractionSpec:
    """Everything that determines the numbers in a feature store.

    Parameters
    ----------
    backbone : str
        Canonical backbone name, e.g. ``featx:efficientnet_lite0`` or ``torchvision:resnet50``.
    weights : str
        The weights tag that was loaded (``IMAGENET1K_V2``, ``in1k``, a checkpoint file name, ...).
    weights_sha256 : str
        Checksum of the loaded parameters and buffers, so re-trained weights under an old tag differ.
    layers : tuple of str
        The layers extracted in one pass (``penultimate`` or the network's own node names).
    pool : str, default="avg"
        Spatial pooling of 4-D (and token pooling of 3-D) layer outputs.
    preprocessing : Preprocessing
        Resize, crop, interpolation and normalisation.
    dtype : str, default="float32"
        Storage dtype of the features.
    amp : str, default="none"
        Autocast precision used for the forward pass (``none`` on CPU).
    tta : str, default="none"
        Test-time augmentation; ``flip`` averages the features of the image and its mirror.
    max_pixels : int
        Larger images are recorded as failures (decompression-bomb guard), and so are images that would be
        larger once their shorter side is resized (a 10000 x 1 strip), so the limit decides which rows hold
        features.
    decode : str, default="exact"
        ``exact`` decodes and resizes as the weights' own transforms do. ``fast`` decodes JPEGs at a
        reduced DCT scale (1/2, 1/4 or 1/8, while the shorter side stays at least the resize size) and
        resizes only the region the centre crop keeps: several times less decoding work for large photos.
        Reduced-scale decoding changes the pixels a little; the crop-region resize alone moves a few
        pixels by one level. ``device`` has DataLoader workers read only the bytes of JPEGs, which are decoded,
        resized and cropped in batches on the extraction device (nvJPEG on CUDA,
        :mod:`featx.extract.device_decode`); other files, and JPEGs it cannot vouch for, take the exact path.
    """

    backbone: str
    weights: str
    weights_sha256: str
    layers: tuple[str, ...]
    preprocessing: Preprocessing
    pool: str = DEFAULT_POOL
    dtype: str = DEFAULT_DTYPE
    amp: str = "none"
    tta: str = DEFAULT_TTA
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode: str = DEFAULT_DECODE
    extractor_version: int = field(default=EXTRACTOR_VERSION)

    def __post_init__(self) -> None:
        table = options_of(ExtractionOptions)
        for name in SPEC_OPTIONS:  # the user's half: its options' own checks
            if name == "amp":
                check_option("amp", self.amp, AMP_MODES)  # recorded resolved: never auto
            else:
                check_value(name, getattr(self, name), table[name][0])
        if not self.layers:
            raise ValueError("an extraction needs at least one layer (the default is 'penultimate')")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers repeat: {list(self.layers)}")

    def options(self, **run: Any) -> ExtractionOptions:
        """The options that make this spec's store again (its recorded pool, dtype, amp, …), with ``run``'s
        options that do not enter a spec (``batch_size``, ``workers``, …).

        Examples
        --------
        >>> spec.options(batch_size=32)  # doctest: +SKIP
        ExtractionOptions(pool='avg', dtype='float32', amp='none', ..., batch_size=32, workers=None)
        """
        return ExtractionOptions(**{name: getattr(self, name) for name in SPEC_OPTIONS}, **run)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); fields newer than the first stores are left out at their default."""
        data = dataclasses.asdict(self)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if data[name] == default:
                del data[name]
        return json.loads(canonical_json(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractionSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer store is never misread."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - known
        if extra:
            raise ValueError(
                f"this store's spec has fields this featx does not know ({', '.join(sorted(extra))}); "
                "it was written by a newer featx: upgrade featx to read it"
            )
        pre = dict(data.pop("preprocessing"))
        pre["input_size"] = tuple(pre["input_size"])
        pre["mean"] = tuple(pre["mean"])
        pre["std"] = tuple(pre["std"])
        data["layers"] = tuple(data["layers"])
        return cls(preprocessing=Preprocessing(**pre), **data)


#: The extraction options that enter a spec (and so a store's key): those of :class:`ExtractionOptions`' table
#: that are fields of :class:`ExtractionSpec`, in the table's order. The others (batch size, workers, fingerprint
#: mode, compilation) change how a run goes, not the numbers.
SPEC_OPTIONS: tuple[str, ...] = tuple(
    name for name in options_of(ExtractionOptions) if name in {f.name for f in dataclasses.fields(ExtractionSpec)}
)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal objects hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(spec: ExtractionSpec, manifest_fingerprint: str) -> str:
    """The store's cache key: a hash of the spec (which includes the extractor version) and the manifest.

    Raises
    ------
    ValueError
        If the fingerprint is empty: a key that cannot be computed is an error, never a random key.
    """
    if not manifest_fingerprint:
        raise ValueError("cannot compute a cache key without the manifest fingerprint")
    payload = canonical_json({"spec": spec.to_dict(), "manifest": manifest_fingerprint})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A spec dict with the fields :meth:`ExtractionSpec.to_dict` leaves out at their default filled in."""
    return {**_OMITTED_AT_DEFAULT, **data}


def spec_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the (nested) fields whose values differ between two spec dicts."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += spec_differences(va, vb, prefix=f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return diffs
