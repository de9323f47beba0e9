"""The test split a labeled manifest gets when its source has none.

A source's own ``test`` split is kept; a source with ``train`` and ``val`` only has its ``val`` split used as the
test split; a source with ``train`` only has :data:`DEFAULT_TEST_FRACTION` of each class carved off, stratified
and seeded, a class of one image staying in train.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_TEST_FRACTION", "check_test_fraction", "ensure_test_split"]

#: Share of each class carved off as the test split when a source has none.
DEFAULT_TEST_FRACTION = 0.2


def check_test_fraction(test_fraction: float) -> float:
    """The one check of a test fraction: strictly between 0 and 1; returns it.

    Raises
    ------
    ValueError
        If it is not.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    return test_fraction


def ensure_test_split(
    labels: np.ndarray, splits: list[str], seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION
) -> tuple[list[str], str]:
    """Give a labeled manifest a test split (see the module docstring).

    Parameters
    ----------
    labels : numpy.ndarray of int
        One class index per row; -1 for unlabeled rows.
    splits : list of str
        The source's split per row.
    seed : int, default=0
        Seed of the carved split.
    test_fraction : float, default=DEFAULT_TEST_FRACTION
        Share of each class carved off when the source has neither a test nor a val split.

    Returns
    -------
    splits : list of str
        The splits with a test split.
    policy : str
        How the test split was chosen, in words (recorded in the store).
    """
    splits = list(splits)
    labeled = labels >= 0
    if not labeled.any() or "test" in splits:
        return splits, "from source"
    if "val" in splits:
        return [
            "test" if s == "val" else s for s in splits
        ], "source has no test split: its val split is the test split"
    check_test_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels[labeled]):
        idx = np.flatnonzero((labels == cls) & np.array([s == "train" for s in splits]))
        if len(idx) < 2:
            continue  # a class with one image stays in train; it could not be both learnt and tested
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        for i in rng.permutation(idx)[:n_test]:
            splits[i] = "test"
    return splits, f"test split carved from train: {test_fraction:g} per class, stratified, seed {seed}"
