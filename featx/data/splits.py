"""TODO docstring"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_TEST_FRACTION", "ensure_test_split"]


DEFAULT_TEST_FRACTION = 0.2


# -------------------------------------------------------------------------------------------- splits
def ensure_test_split(
    labels: np.ndarray, splits: list[str], seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION
) -> tuple[list[str], str]:
    """Give a labeled manifest a test split (see the module docstring); returns ``(splits, policy)``."""
    splits = list(splits)
    labeled = labels >= 0
    if not labeled.any() or "test" in splits:
        return splits, "from source"
    if "val" in splits:
        return [
            "test" if s == "val" else s for s in splits
        ], "source has no test split: its val split is the test split"
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels[labeled]):
        idx = np.flatnonzero((labels == cls) & np.array([s == "train" for s in splits]))
        if len(idx) < 2:
            continue  # a class with one image stays in train; it could not be both learnt and tested
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        for i in rng.permutation(idx)[:n_test]:
            splits[i] = "test"
    return splits, f"test split carved from train: {test_fraction:g} per class, stratified, seed {seed}"
