"""The split plan: train / val / test carved once per dataset, the same for every row of a comparison.

A source's own splits are kept; what it lacks is carved, stratified, from its ``train`` split:

- a source with ``train``, ``val`` and ``test``: used as it is;
- ``train`` and ``test``: :attr:`SplitPlan.val_fraction` of each class of train becomes val;
- ``train`` and ``val`` (hymenoptera's folders, for instance): its val split is the test split, and val is
  carved from train;
- ``train`` only: :attr:`SplitPlan.test_fraction` of each class becomes test, then ``val_fraction`` of what is
  left becomes val.

Which image goes where depends on the split seed and the image's id only (each row is ordered by a hash of
``(seed, id)``), never on the row order or on any training seed: the same ids, labels and source splits give
the same plan in the feature store, in fine-tuning and in every pipeline row. A class with one training image
keeps it in train. :func:`split_hashes` summarises a plan in one hash per split, recorded in every result, so
two results can be checked for having used the same images.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from featx._runtime.params import Choices, Interval, check_options, option

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "REFITS",
    "SELECTION_RULE",
    "FinalFit",
    "SplitPlan",
    "selection_rule",
    "split_hashes",
]

log = logging.getLogger(__name__)

#: Share of each class carved off as the test split when a source has none.
DEFAULT_TEST_FRACTION = 0.2

#: Share of each class of train carved off as the val split when a source has none. Every row selects its
#: hyper-parameters (C, the fine-tune's rate and epoch) on these images, so they must be enough to rank
#: candidates: 0.2 gives hymenoptera 49 val images and digits 287 (0.1 would leave hymenoptera 24, where one
#: image moves accuracy by 4 points).
DEFAULT_VAL_FRACTION = 0.2

#: The rule every row of a comparison follows, classifiers and fine-tunes alike (the report states it), under the
#: default refit (``"train"``); :func:`selection_rule` words it for either.
SELECTION_RULE = "fit on train, hyper-parameters chosen on val, scored once on test; no refit on train+val"

#: What the final model of a row is fit on once val has chosen its hyper-parameters: ``train`` (val only ever
#: chooses), or ``train+val`` (Kornblith et al. 2019: the chosen C, or the chosen rate and number of epochs, fit
#: again on train and val together). Every row of a comparison refits alike (a dataset's ``refit`` in a job).
#: ``train`` is the default although the refit gained on every row measured (frozen rows +0.0 to +2.5 pt on
#: hymenoptera and digits, the default fine-tune +0.7 pt on hymenoptera and +4.7 pt on a CIFAR-10 subset: test
#: accuracies, benchmarks/RESULTS.md "Refit on train+val"): val cannot see a refit (it becomes training data), so
#: making it the default would be a default chosen on test; a fine-tune's refit is a second training run (about
#: doubling its compute); and the decision's rows are chosen on val either way. It is the option for final numbers.
REFITS = ("train", "train+val")

#: The split seed's default. It is separate from every training seed: changing a classifier's or a
#: fine-tune's seed never moves an image between splits.
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class SplitPlan:
    """How a dataset's train / val / test splits are carved (see the module docstring).

    Parameters
    ----------
    split_seed : int, default=DEFAULT_SPLIT_SEED
        Seed of the carved splits; separate from every training seed.
    val_fraction : float, default=DEFAULT_VAL_FRACTION
        Share of each class of train that becomes val when the source has no val split (or uses it as test).
    test_fraction : float, default=DEFAULT_TEST_FRACTION
        Share of each class that becomes test when the source has neither a test nor a val split.
    """

    split_seed: int = option(
        DEFAULT_SPLIT_SEED,
        Interval(True, 0),
        help="Seed of the carved splits (separate from the training seed): the same seed, the same images.",
    )
    val_fraction: float = option(
        DEFAULT_VAL_FRACTION,
        Interval(False, 0, 1, "neither"),
        help="Share of each class of train carved off as val (where hyper-parameters are chosen) when the source "
        "has no val split.",
    )
    test_fraction: float = option(
        DEFAULT_TEST_FRACTION,
        Interval(False, 0, 1, "neither"),
        help="Share of each class carved off as test when the source has neither test nor val.",
    )

    def __post_init__(self) -> None:
        check_options(self)  # every option against its table, once

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready settings."""
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What makes two plans carve the same splits of the same rows: its settings (the carving has no
        version of its own yet; a change to it would add one here)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SplitPlan:
        """The plan a :meth:`to_dict` wrote (the default plan for ``None``)."""
        return cls(**(data or {}))

    def assign(
        self,
        ids: Sequence[str],
        labels: np.ndarray,
        source_splits: Sequence[str],
        class_names: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, str]:
        """The split of every row under this plan.

        A class left without a val or a test image (one image in all, or a source whose test split lacks it) is
        named in a warning and in the policy: it is learnt but never validated or tested, and test scores,
        balanced accuracy included, cover the other classes only.

        Parameters
        ----------
        ids : sequence of str
            The rows' unique ids (what the carving hashes).
        labels : numpy.ndarray of int
            Class index per row; -1 for unlabeled rows (never moved).
        source_splits : sequence of str
            The split the source gave each row (``train``, ``val``, ``test`` or ``unlabeled``).
        class_names : sequence of str, optional
            The names of the classes, for the warning (``class 3`` without them).

        Returns
        -------
        splits : numpy.ndarray of str
            One of ``train``, ``val``, ``test``, ``unlabeled`` per row.
        policy : str
            How the splits came about, in words (for the report).
        """
        labels = np.asarray(labels)
        splits = np.array(list(source_splits), dtype=object)
        labelled = labels >= 0
        present = set(splits[labelled].tolist())
        policy = []
        if "test" in present:
            policy.append("test from the source")
        elif "val" in present:
            splits[labelled & (splits == "val")] = "test"
            policy.append("the source's val split is the test split")
        elif labelled.any():
            self._carve(ids, labels, splits, "test", self.test_fraction)
            policy.append(f"test carved from train ({self.test_fraction:g} per class)")
        if "val" in present and "test" in present:
            policy.append("val from the source")
        elif labelled.any():
            self._carve(ids, labels, splits, "val", self.val_fraction)
            policy.append(f"val carved from train ({self.val_fraction:g} per class)")
        policy.append(f"stratified, split seed {self.split_seed}")
        policy += _unevaluated_classes(labels, splits, class_names)
        return splits.astype(str), "; ".join(policy)

    def _carve(self, ids: Sequence[str], labels: np.ndarray, splits: np.ndarray, to: str, fraction: float) -> None:
        """Move ``fraction`` of each class's train rows to ``to``, chosen by a hash of (seed, split, id)."""
        train = splits == "train"
        for cls in np.unique(labels[train & (labels >= 0)]):
            rows = np.flatnonzero(train & (labels == cls))
            if len(rows) < 2:
                continue  # a class with one image stays in train: it could not be both learnt and held out
            n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
            order = sorted(rows, key=lambda r: _rank(self.split_seed, to, ids[r]))
            splits[order[:n]] = to


@dataclass(frozen=True)
class FinalFit:
    """What a row's final model is fit on once val has chosen (the protocol's one option beside the split plan;
    not part of :class:`SplitPlan`, as it moves no image between splits and a store never depends on it).

    Parameters
    ----------
    refit : {"train", "train+val"}, default="train"
        One of :data:`REFITS`.
    """

    refit: str = option(
        "train",
        Choices(REFITS),
        help="Fit the final model on train, or again on train+val with what val chose (Kornblith et al. 2019); "
        "every row of a comparison should refit alike.",
    )

    def __post_init__(self) -> None:
        check_options(self)  # the one check of a refit setting


def selection_rule(refit: str = "train") -> str:
    """:data:`SELECTION_RULE` as it reads under ``refit``."""
    if FinalFit(refit).refit == "train":
        return SELECTION_RULE
    return "hyper-parameters chosen on val (fit on train), then fit again on train+val with them, scored once on test"


def _unevaluated_classes(labels: np.ndarray, splits: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    """Say (a warning, and words for the policy) which classes have no val or no test image."""
    labelled = labels >= 0
    classes = np.unique(labels[labelled])
    notes = []
    for cls in classes:
        in_class = labelled & (labels == cls)
        missing = [s for s in ("val", "test") if not (in_class & (splits == s)).any()]
        if not missing:
            continue
        name = repr(class_names[cls]) if class_names is not None and cls < len(class_names) else str(int(cls))
        n = int(in_class.sum())
        notes.append(f"class {name} ({n} image{'s' if n > 1 else ''}) has no {' or '.join(missing)} image")
    if notes:
        tested = sum(bool((labelled & (labels == cls) & (splits == "test")).any()) for cls in classes)
        log.warning(
            "%s: such a class is learnt but never scored there, and test scores (balanced accuracy included) cover "
            "only the %d of %d classes that have test images. Give each class at least 3 images (for train, val "
            "and test), or leave it out of the source",
            "; ".join(notes),
            tested,
            len(classes),
        )
    return notes


def _rank(seed: int, split: str, row_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{split}\0{row_id}".encode()).digest()


def split_hashes(ids: Sequence[str], splits: Sequence[str]) -> dict[str, str]:
    """One short hash of the sorted ids in each split (``train``, ``val``, ``test``) that has rows.

    Two results whose hashes agree were trained, selected and tested on the same images.

    Parameters
    ----------
    ids : sequence of str
    splits : sequence of str
        The split of each id (``unlabeled`` rows are left out).

    Returns
    -------
    dict of str to str
        ``"N:sha256-prefix"`` per split that has rows.
    """
    by_split: dict[str, list[str]] = {}
    for row_id, split in zip(ids, splits, strict=True):
        if split in ("train", "val", "test"):
            by_split.setdefault(split, []).append(row_id)
    out = {}
    for split in ("train", "val", "test"):
        if split in by_split:
            digest = hashlib.sha256("\n".join(sorted(by_split[split])).encode()).hexdigest()
            out[split] = f"{len(by_split[split])}:{digest[:16]}"
    return out
