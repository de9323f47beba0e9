"""The manifest: the rows of one job (ids, paths, labels, splits, class names) and the images' fingerprint.

:data:`FINGERPRINT_MODES` is defined in :mod:`featx.spec` with the other extraction options and re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from featx.exceptions import UnknownNameError
from featx.spec import DEFAULT_FINGERPRINT, FINGERPRINT_MODES, canonical_json, check_option

__all__ = ["FINGERPRINT_MODES", "IMAGE_EXTENSIONS", "SPLITS", "Manifest"]

log = logging.getLogger(__name__)


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
        How the test split came about (from the source, its val split, or carved with a seed).
    """

    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    class_names: list[str]
    source: str
    split_policy: str = "from source"

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

    def fingerprint(self, mode: str = DEFAULT_FINGERPRINT) -> str:
        """A hash of what the features depend on: ids, labels, splits, class names and the files.

        Parameters
        ----------
        mode : {"stat", "content"}, default="stat"
            ``stat`` hashes each file's path, size and modification time (fast); ``content`` hashes the
            bytes (slow, but survives copies and ``touch``), and logs a warning naming byte-identical files
            that sit in more than one split.
        """
        check_option("fingerprint", mode)
        digest = hashlib.sha256()
        digest.update(canonical_json({"classes": self.class_names, "mode": mode}).encode())
        by_content: dict[str, list[int]] = defaultdict(list)
        rows = zip(self.ids, self.paths, self.labels.tolist(), self.splits, strict=True)
        for i, (row_id, path, label, split) in enumerate(rows):
            signature = _file_signature(path, mode)
            digest.update(canonical_json([row_id, label, split, signature]).encode())
            if mode == "content" and split != "unlabeled" and len(signature) == 1 and len(signature[0]) == 64:
                by_content[signature[0]].append(i)
        self._warn_of_copies_across_splits(by_content)
        return f"{mode}:{digest.hexdigest()}"

    def _warn_of_copies_across_splits(self, by_content: dict[str, list[int]]) -> None:
        """Log the byte-identical files that sit in more than one of train, val and test: the test set leaks."""
        leaks = [group for group in by_content.values() if len({self.splits[i] for i in group}) > 1]
        if leaks:
            shown = "; ".join(" = ".join(f"{self.ids[i]} ({self.splits[i]})" for i in group) for group in leaks[:5])
            more = f"; and {len(leaks) - 5} more" if len(leaks) > 5 else ""
            log.warning(
                "%s: the same image sits in more than one split (byte-identical files, %d case%s), so the test "
                "set leaks into training: %s%s. Remove the copies, or keep each in one split",
                self.source,
                len(leaks),
                "" if len(leaks) == 1 else "s",
                shown,
                more,
            )


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
