"""A store's labelled training rows as arrays (in memory) or row indices (streamed), for the classifiers."""

from __future__ import annotations

import logging

import numpy as np

from featx.store.reader import FeatureStore

log = logging.getLogger(__name__)


#: Rows read from the store at a time: the only copy beside the features themselves (335 MB at 1,280 float32).
_READ_ROWS = 65536


def labelled_rows(store: FeatureStore, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (float32), labels and split names of the labelled train/val rows.

    The features are read once, block by block, into one array of their final size, so reading costs the
    features plus one block (not a copy per split, a concatenation and a selection).
    """
    parts = [(split, store.labels(split)) for split in ("train", "val") if store.splits.get(split)]
    if not parts:
        raise ValueError(f"{store.path} has no labelled training images")
    y = np.concatenate([labels for _, labels in parts])
    split_of = np.repeat([split for split, _ in parts], [len(labels) for _, labels in parts])
    keep = _labelled_mask(store, y, split_of)
    X = np.empty((int(keep.sum()), store.feature_dims()[layer or store.layers[0]]), dtype=np.float32)
    at = 0
    for split, _ in parts:
        for block, labels, _ in store.iter_chunks(layer, split, chunk_size=_READ_ROWS):
            block = block if (labels >= 0).all() else block[labels >= 0]
            X[at : at + len(block)] = block
            at += len(block)
    return X, y[keep], split_of[keep]


def labelled_store_rows(store: FeatureStore) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(rows, labels)`` of the labelled train rows and of the labelled val rows (for streaming the store)."""
    rows = {split: store.rows(split) for split in ("train", "val")}
    labels = {split: store.labels(split) for split in rows}
    _labelled_mask(store, np.concatenate(list(labels.values())), np.repeat(list(rows), [len(r) for r in rows.values()]))
    train, val = ((rows[s][labels[s] >= 0], labels[s][labels[s] >= 0]) for s in rows)
    return train, val


def _labelled_mask(store: FeatureStore, y: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Which training rows have a label (not -1); refuses training rows of which none has one."""
    labelled = y >= 0
    if not len(y):
        raise ValueError(f"{store.path} has no labelled training images")
    if not labelled.any():
        raise ValueError(
            f"{store.path}: its {len(y)} training rows ({', '.join(dict.fromkeys(splits.tolist()))}) have no labels "
            "(every label is -1); a classifier learns from labelled train images: give the source its labels "
            "(class folders or a label column)"
        )
    if not labelled.all():
        log.warning("%s: %d training rows without a label are left out", store.path, int((~labelled).sum()))
    return labelled
