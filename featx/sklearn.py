"""A scikit-learn transformer from image paths to convnet features, through featx's store cache.

``make_pipeline(ConvNetFeatures(), LinearSVC())`` works with ``cross_val_score``, ``GridSearchCV`` and
``clone``: images are embedded once per extraction spec and reused from the stores in ``cache_dir``
by every fold and every later call, as long as the files are unchanged (size and modification time).
The loaded network is kept too (the last :data:`MAX_NETWORKS` backbones), so a fit whose features are all
cached costs no network load; :func:`clear_network_cache` frees them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx._runtime.env import cache_dir as default_cache_dir
from featx._runtime.params import options_of
from featx.backbones.features import Backbone
from featx.backbones.loading import load_backbone
from featx.backbones.names import PENULTIMATE, parse_backbone_name
from featx.spec import (
    DEFAULT_BACKBONE,
    DEFAULT_DECODE,
    DEFAULT_DTYPE,
    DEFAULT_POOL,
    DEFAULT_TTA,
    SPEC_OPTIONS,
    ExtractionOptions,
    ExtractionSpec,
)

__all__ = ["MAX_NETWORKS", "ConvNetFeatures", "clear_network_cache"]


#: Loaded networks kept for later fits (a grid search's clones fit the same backbone again and again).
MAX_NETWORKS = 2

_networks: OrderedDict[tuple[str, Any], Backbone] = OrderedDict()
_fitted: OrderedDict[tuple[Any, ...], tuple[dict[str, Any], int]] = OrderedDict()
_cache_lock = threading.Lock()


def clear_network_cache() -> None:
    """Drop the networks (and the specs worked out from them) that :class:`ConvNetFeatures` keeps loaded."""
    with _cache_lock:
        _networks.clear()
        _fitted.clear()


def _weights_stamp(backbone: str) -> tuple[int, int] | None:
    """Size and modification time of a checkpoint backbone's file (a new file is a new network); else None.

    Named weights (``torchvision:…``, ``timm:…``, ``featx:…``) are fixed by their tag."""
    parsed = parse_backbone_name(backbone)
    if parsed.source != "file":
        return None
    try:
        st = os.stat(Path(parsed.path).expanduser())
    except OSError:
        return None  # load_backbone says what is wrong
    return st.st_size, st.st_mtime_ns


def _network(key: tuple[str, Any]) -> Backbone:
    """The loaded backbone ``key[0]``, from the cache when it is there (least recently used goes first)."""
    with _cache_lock:
        if key in _networks:
            _networks.move_to_end(key)
            return _networks[key]
    net = load_backbone(key[0])  # parses the name first: an unknown one fails before any download
    with _cache_lock:
        _networks[key] = net
        while len(_networks) > MAX_NETWORKS:
            _networks.popitem(last=False)
    return net


def _as_paths(X: Any) -> list[str]:
    if isinstance(X, str | os.PathLike):
        raise ValueError("X must be a sequence of image paths, not a single path; wrap it in a list")
    if isinstance(X, list | tuple):
        items = list(X)
    else:  # arrays, array-likes, one-column frames: read their values, never iterate (a frame gives its columns)
        array = np.asarray(X, dtype=object)
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise ValueError(
                f"X must be a list, a 1-D array or one column of image paths; got an array of shape {array.shape}"
            )
        items = list(array)
    if not items:
        raise ValueError("X holds no image paths")
    bad = [type(x).__name__ for x in items if not isinstance(x, str | os.PathLike)]
    if bad:
        raise ValueError(f"X must hold image paths (str or Path); found {bad[0]} values")
    return [str(Path(x).expanduser().resolve()) for x in items]


class ConvNetFeatures(TransformerMixin, BaseEstimator):
    """Embed images (given as file paths) with a frozen pretrained backbone.

    Parameters
    ----------
    backbone : str, default="featx:efficientnet_lite0"
        ``SOURCE:NAME[.TAG]`` as for ``featx extract``.
    layer : str, default="penultimate"
        A layer of the backbone (``featx backbones --layers NAME`` lists them).
    pool : {"avg", "max", "avgmax", "gem", "none"}, default="avg"
    dtype : {"float32", "float16"}, default="float32"
        Storage dtype in the cache; ``transform`` always returns float32.
    tta : {"none", "flip"}, default="none"
    decode : {"exact", "fast", "device"}, default="exact"
        ``fast`` decodes large JPEGs at a reduced scale (see :class:`featx.spec.ExtractionOptions`).
    device : str, default="auto"
    batch_size : int, default=64
    cache_dir : str or Path, optional
        Folder of the feature stores; by default ``<featx cache>/stores``.
    progress : bool, default=False

    Attributes
    ----------
    spec_ : dict
        The extraction spec (backbone, weights checksum, preprocessing, ...) set by :meth:`fit`.
    n_features_out_ : int
        Features per image, set by :meth:`fit`.

    Notes
    -----
    The parameters named like an option of :class:`~featx.spec.ExtractionOptions` (``pool``, ``dtype``, ``tta``,
    ``decode``, ``batch_size``) are that option: :meth:`fit` builds one ``ExtractionOptions`` of them, checked by
    its table. They are written out because scikit-learn reads an estimator's parameters from ``__init__``.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.svm import LinearSVC
    >>> model = make_pipeline(ConvNetFeatures(), LinearSVC())  # doctest: +SKIP
    >>> model.fit(train_paths, train_labels).score(test_paths, test_labels)  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layer: str = PENULTIMATE,
        pool: str = DEFAULT_POOL,
        dtype: str = DEFAULT_DTYPE,
        tta: str = DEFAULT_TTA,
        decode: str = DEFAULT_DECODE,
        device: str = "auto",
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.layer = layer
        self.pool = pool
        self.dtype = dtype
        self.tta = tta
        self.decode = decode
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.progress = progress

    def _store_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir() / "stores"

    def fit(self, X: Sequence[str | Path], y: Any = None) -> ConvNetFeatures:
        """Validate the parameters, load the backbone once and resolve its spec (no image is read).

        Parameters
        ----------
        X : sequence of str or Path
            Image paths (only checked to be paths here).
        y : ignored

        Returns
        -------
        ConvNetFeatures
            ``self``, with :attr:`spec_` and :attr:`n_features_out_` set.
        """
        from featx._runtime.device import resolve_amp, resolve_device

        _as_paths(X)
        options = self._options()
        amp = resolve_amp(options.amp, resolve_device(self.device))
        network = (self.backbone, _weights_stamp(self.backbone))
        key = (*network, self.layer, amp, *(getattr(options, name) for name in SPEC_OPTIONS))
        with _cache_lock:
            known = _fitted.get(key)
        if known is None:
            known = self._spec_and_width(_network(network), options, amp)
            with _cache_lock:
                _fitted[key] = known
                while len(_fitted) > 32 * MAX_NETWORKS:
                    _fitted.popitem(last=False)
        spec, self.n_features_out_ = known
        self.spec_ = copy.deepcopy(spec)  # each estimator its own: the cached one stays as computed
        return self

    def _options(self) -> ExtractionOptions:
        """The :class:`~featx.spec.ExtractionOptions` of the parameters that are its options (checked by its table)."""
        table = options_of(ExtractionOptions)
        return ExtractionOptions(**{k: v for k, v in self.get_params(deep=False).items() if k in table})

    def _spec_and_width(self, net: Backbone, options: ExtractionOptions, amp: str) -> tuple[dict[str, Any], int]:
        """The extraction spec of this layer of ``net`` under ``options``, and its features per image."""
        from featx.backbones.features import feature_dims
        from featx.extract.api import build_spec, effective_pool

        feature_model = net.feature_model([self.layer], options.pool)  # checks the layer
        pooled = dataclasses.replace(options, pool=effective_pool(net, feature_model, options.pool))
        spec = build_spec(net, [self.layer], pooled, amp=amp).to_dict()
        return spec, feature_dims(feature_model, net.preprocessing)[self.layer]

    def __sklearn_tags__(self) -> Any:
        """Image paths in (strings, one per sample), float32 features out, no target needed."""
        tags = super().__sklearn_tags__()
        tags.input_tags.one_d_array = True
        tags.input_tags.two_d_array = False  # a column of paths is accepted, numbers are not
        tags.input_tags.string = True
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = []  # strings cannot be preserved
        return tags

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"X_types": ["string"], "preserves_dtype": [], "requires_y": False}

    def transform(self, X: Sequence[str | Path]) -> np.ndarray:
        """``[n_images, n_features]`` float32 features, extracting only images not cached yet.

        Raises
        ------
        ValueError
            If some images cannot be read (the message lists them); a transformer must return a row for each.
        """
        from featx.data.sources import from_files
        from featx.extract.api import extract

        check_is_fitted(self, "spec_")
        paths = _as_paths(X)
        unique = list(dict.fromkeys(paths))
        found = self._from_cached_stores(unique)
        missing = [p for p in unique if p not in found]
        if missing:
            spec = ExtractionSpec.from_dict(self.spec_)  # the fitted options, whatever set_params did since
            result = extract(
                from_files(missing),
                self.backbone,
                layers=list(spec.layers),
                options=spec.options(batch_size=self.batch_size),
                device=self.device,
                progress=self.progress,
                max_failures="inf",
                expect_weights_sha256=spec.weights_sha256,
                store_dir=self._store_dir(),
            )
            if result.failures:
                listed = "; ".join(f"{f.id}: {f.reason}" for f in result.failures[:5])
                raise ValueError(f"{len(result.failures)} images could not be read ({listed}); remove or fix them")
            found.update(self._from_cached_stores(missing, only=result.path))
        return np.stack([found[p] for p in paths]).astype(np.float32, copy=False)

    def _from_cached_stores(self, paths: list[str], only: Path | None = None) -> dict[str, np.ndarray]:
        """Features of ``paths`` from complete stores with this spec whose files are unchanged."""
        from featx.store.reader import FeatureStore

        folder = self._store_dir()
        candidates = [only] if only is not None else sorted(folder.glob("*.h5")) if folder.is_dir() else []
        wanted = set(paths)
        found: dict[str, np.ndarray] = {}
        ours = {k: v for k, v in self.spec_.items() if k != "layers"}
        for store_path in candidates:
            if not wanted:
                break
            try:
                store = FeatureStore(store_path)
            except (OSError, ValueError, RuntimeError):
                continue
            with store:
                theirs = {k: v for k, v in store.spec.to_dict().items() if k != "layers"}
                if theirs != ours or self.layer not in store.layers:
                    continue
                store_paths = store.paths()
                hits = [i for i, p in enumerate(store_paths) if p in wanted]
                if not hits:
                    continue
                sizes, mtimes = store.file_stats()
                fresh = []
                for i in hits:
                    try:
                        st = os.stat(store_paths[i])
                    except OSError:
                        continue
                    if (st.st_size, st.st_mtime_ns) == (sizes[i], mtimes[i]):
                        fresh.append(i)
                if not fresh:
                    continue
                rows = store.rows()[fresh]  # only the rows asked for: memory follows the request, not the store
                block, _ = store.read_rows(rows, self.layer)
                for i, vector in zip(fresh, block.astype(np.float32, copy=False), strict=True):
                    found[store_paths[i]] = vector
                    wanted.discard(store_paths[i])
        return found

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``<layer>_0 … <layer>_{D-1}``, one name per output feature.

        Parameters
        ----------
        input_features : ignored
            The inputs are image paths, not named features.

        Returns
        -------
        numpy.ndarray of str
        """
        check_is_fitted(self, "n_features_out_")
        return np.array([f"{self.layer}_{i}" for i in range(self.n_features_out_)], dtype=object)
