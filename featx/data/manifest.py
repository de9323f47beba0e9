"""The manifest: the rows of one job (ids, paths, labels, splits, class names) and the images' fingerprint.

:data:`FINGERPRINT_MODES` is defined in :mod:`featx.spec` with the other extraction options and re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from featx.data.splits import SplitPlan
from featx.exceptions import UnknownNameError
from featx.spec import DEFAULT_FINGERPRINT, FINGERPRINT_MODES, canonical_json, check_option

__all__ = ["FINGERPRINT_MODES", "IMAGE_EXTENSIONS", "SPLITS", "Manifest", "labels_fingerprint", "stat_fingerprint"]

#: Split names a manifest may hold; ``unlabeled`` rows are for prediction only.
SPLITS = ("train", "val", "test", "unlabeled")


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")


_SOURCE_HINT = (
    "A SOURCE is an image folder, a .tar/.tar.gz/.zip of one, a .csv/.tsv manifest (path,label[,split]), "
    "a .txt list of image paths, 'digits', or 'torchvision:NAME'."
)


@dataclass
class Manifest:
    """The images of one job, row by row.

    Attributes
    ----------
    ids : list of str
        Stable, unique ids (the path relative to the source root, or a dataset index).
    paths : list of str
        Absolute file paths.
    labels : numpy.ndarray of int64
        Index into ``class_names``; -1 for unlabeled rows.
    splits : list of str
        One of :data:`SPLITS` per row.
    class_names : list of str
        Class names in label order.
    source : str
        What the manifest was built from, e.g. ``folder:/data/hymenoptera``.
    split_policy : str
        How the splits came about: as the source gives them, or carved by a split plan (:meth:`with_plan`).
    """

    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    class_names: list[str]
    source: str
    split_policy: str = "as the source gives them"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.ids)
        if not (len(self.paths) == len(self.labels) == len(self.splits) == n):
            raise ValueError("manifest columns differ in length")
        if n == 0:
            raise ValueError(f"no images found in {self.source}. {_SOURCE_HINT}")
        dupes = [i for i, c in Counter(self.ids).items() if c > 1]
        if dupes:
            raise ValueError(f"manifest ids must be unique; repeated: {dupes[:5]}")
        bad = sorted(set(self.splits) - set(SPLITS))
        if bad:
            raise UnknownNameError(f"unknown split(s) {bad}; splits are {', '.join(SPLITS[:3])}")
        if self.labels.size and (self.labels.max() >= len(self.class_names) or self.labels.min() < -1):
            raise ValueError("labels must index class_names (or be -1 for unlabeled rows)")

    def __len__(self) -> int:
        return len(self.ids)

    def split_counts(self) -> dict[str, int]:
        """Number of rows per split, in :data:`SPLITS` order."""
        counts = Counter(self.splits)
        return {s: counts[s] for s in SPLITS if counts[s]}

    def with_plan(self, plan: SplitPlan | None = None) -> Manifest:
        """This manifest with its splits carved by ``plan`` (the default plan for ``None``).

        The source's splits are respected (see :mod:`featx.data.splits`); ``split_policy`` says what was done.
        """
        plan = plan or SplitPlan()
        splits, policy = plan.assign(self.ids, self.labels, self.splits, self.class_names)
        return replace(self, splits=splits.tolist(), split_policy=policy)

    def images_fingerprint(self, mode: str = DEFAULT_FINGERPRINT) -> str:
        """A hash of what the features depend on: the ids and the image files, nothing else.

        Labels, class names and splits are left out, so relabelling a CSV or a new split plan keeps a feature
        store's cache key.

        Parameters
        ----------
        mode : {"stat", "content"}, default="stat"
            ``stat`` hashes each file's path, size and modification time (fast); ``content`` hashes the
            bytes (slow, but survives copies and ``touch``), and refuses byte-identical files that sit in more
            than one split.

        Raises
        ------
        ValueError
            In ``content`` mode, for byte-identical files in more than one of train, val and test (the test set
            would leak into training); the message names them.
        """
        check_option("fingerprint", mode)
        signatures = [_file_signature(path, mode) for path in self.paths]
        if mode == "content":
            by_content: dict[str, list[int]] = defaultdict(list)
            for i, signature in enumerate(signatures):
                if self.splits[i] != "unlabeled" and len(signature) == 1 and len(signature[0]) == 64:
                    by_content[signature[0]].append(i)
            self._refuse_copies_across_splits(by_content)
        return _images_digest(mode, self.ids, signatures)

    def labels_fingerprint(self) -> str:
        """A hash of the labels layer: ids, labels, splits and class names (the images themselves left out)."""
        return labels_fingerprint(self.ids, self.labels, self.splits, self.class_names)

    def fingerprint(self, mode: str = DEFAULT_FINGERPRINT) -> str:
        """A hash of the images and of the labels layer together: two manifests that agree on it hold the
        same images with the same labels and splits (fine-tuning's ranks check it)."""
        return f"{self.images_fingerprint(mode)}+{self.labels_fingerprint()}"

    def _refuse_copies_across_splits(self, by_content: dict[str, list[int]]) -> None:
        """Refuse byte-identical files that sit in more than one of train, val and test: the test set leaks."""
        leaks = [group for group in by_content.values() if len({self.splits[i] for i in group}) > 1]
        if leaks:
            shown = "; ".join(" = ".join(f"{self.ids[i]} ({self.splits[i]})" for i in group) for group in leaks[:5])
            more = f"; and {len(leaks) - 5} more" if len(leaks) > 5 else ""
            raise ValueError(
                f"{self.source}: the same image sits in more than one split (byte-identical files, {len(leaks)} "
                f"case{'' if len(leaks) == 1 else 's'}), so the test set would leak into training: {shown}{more}. "
                "Remove the copies, or keep each in one split"
            )


def _images_digest(mode: str, ids: Sequence[str], signatures: Sequence[list]) -> str:
    digest = hashlib.sha256()
    digest.update(canonical_json({"images": len(ids), "mode": mode}).encode())
    for row_id, signature in zip(ids, signatures, strict=True):
        digest.update(canonical_json([row_id, signature]).encode())
    return f"images-{mode}:{digest.hexdigest()}"


def labels_fingerprint(
    ids: Sequence[str], labels: Sequence[int] | np.ndarray, splits: Sequence[str], class_names: Sequence[str]
) -> str:
    """:meth:`Manifest.labels_fingerprint` from the columns themselves (a joined store computes its own)."""
    payload = {
        "classes": list(class_names),
        "ids": list(ids),
        "labels": [int(v) for v in labels],
        "splits": list(splits),
    }
    return "labels:" + hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def stat_fingerprint(ids: Sequence[str], paths: Sequence[str], sizes: np.ndarray, mtimes_ns: np.ndarray) -> str:
    """:meth:`Manifest.images_fingerprint` in ``stat`` mode, from recorded file sizes and times (-1: missing).

    A feature store records these per row, so a store can be matched to a manifest without either's key.
    """
    signatures = [
        [path, "missing"] if int(size) < 0 else [path, int(size), int(mtime)]
        for path, size, mtime in zip(paths, sizes, mtimes_ns, strict=True)
    ]
    return _images_digest("stat", ids, signatures)


def _file_signature(path: str, mode: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, "missing"]
    if mode == "stat":
        return [path, st.st_size, st.st_mtime_ns]
    if not stat.S_ISREG(st.st_mode):  # never open a FIFO or device: reading one could block forever
        return ["not a regular file"]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        return ["unreadable", exc.errno]
    return [h.hexdigest()]


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
