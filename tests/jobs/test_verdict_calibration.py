"""The verdict's error rates, by simulation through the real verdict code (the decision issue's calibration).

Rows of equal true accuracy must not be called "significantly lower" than the reference more often than the
nominal 5 %, at any test size or number of rows, because the reference is chosen on val; picked on test, the same
rows are (the second test shows the check has the power to fail). The decision must not say "fine-tuning pays"
when it does not, nor "frozen is enough" when the true gain equals the margin, more than 5 % of the time.
"""

from __future__ import annotations

import numpy as np
import pytest

import featx.jobs.verdict as verdict_module
from featx.jobs.verdict import ALPHA, verdict


def _rows(rng, n: int, k: int, accuracy: float = 0.9, n_val: int = 200) -> list[dict]:
    ids = [f"i{j}" for j in range(n)]
    rows = []
    for r in range(k):
        right = rng.random(n) < accuracy
        rows.append(
            {
                "method": f"row{r}",
                "kind": "classifier",
                "baseline": False,
                "seed": 0,
                "accuracy": float(right.mean()),
                "val_accuracy": float(rng.binomial(n_val, accuracy) / n_val),  # chosen on val: independent of test
                "compute_s": 1.0,
                "predictions": {"ids": ids, "true": [1] * n, "predicted": right.astype(int).tolist()},
            }
        )
    return rows


def _false_lower_rate(rng, n: int, k: int, reps: int) -> float:
    claims = 0
    for _ in range(reps):
        found = verdict(_rows(rng, n, k))
        claims += any(c.p_holm is not None and c.p_holm < ALPHA for c in found.rows)
    return claims / reps


@pytest.mark.parametrize(("n", "k"), [(150, 2), (150, 12), (359, 8), (1000, 2), (1000, 12)])
def test_equal_rows_are_called_lower_at_most_at_the_nominal_rate(n, k):
    rate = _false_lower_rate(np.random.default_rng(n * 100 + k), n, k, reps=200)
    assert rate <= ALPHA, f"{rate:.1%} of verdicts claimed a row significantly lower (n = {n}, {k} rows)"


def test_the_check_fails_when_the_reference_is_picked_on_test(monkeypatch):
    def on_test(methods, key):  # the old rule: best test accuracy
        return max(methods, key=lambda m: m.runs[key][0]["accuracy"])

    monkeypatch.setattr(verdict_module, "_choose", on_test)
    rate = _false_lower_rate(np.random.default_rng(7), 1000, 12, reps=200)
    assert rate > ALPHA, f"picked on test, {rate:.1%} false claims: the calibration test would not notice"


def _pair_rows(rng, n: int, gain: float, discordant: float = 0.12) -> list[dict]:
    """A fine-tune and a frozen row whose true accuracy differs by ``gain``, disagreeing on ``discordant``."""
    ids = [f"i{j}" for j in range(n)]
    u = rng.random(n)
    only_tuned, only_frozen = discordant / 2 + gain / 2, discordant / 2 - gain / 2
    tuned = (u < only_tuned) | (u >= discordant + 0.05)  # 5 % both wrong
    frozen = ((u >= only_tuned) & (u < only_tuned + only_frozen)) | (u >= discordant + 0.05)
    rows = []
    for name, kind, right in (("ft", "finetune", tuned), ("svm", "classifier", frozen)):
        rows.append(
            {
                "method": name,
                "kind": kind,
                "baseline": False,
                "seed": 0,
                "accuracy": float(right.mean()),
                "val_accuracy": 0.9,
                "compute_s": 1.0,
                "predictions": {"ids": ids, "true": [1] * n, "predicted": right.astype(int).tolist()},
            }
        )
    return rows


@pytest.mark.parametrize("n", [150, 359, 1000])
def test_the_decision_keeps_its_error_rates(n):
    rng = np.random.default_rng(n)
    reps = 300
    pays = sum(verdict(_pair_rows(rng, n, 0.0)).question.outcome == "pays" for _ in range(reps)) / reps
    enough = sum(verdict(_pair_rows(rng, n, 0.01)).question.outcome == "enough" for _ in range(reps)) / reps
    assert pays <= 0.05, f"'fine-tuning pays' with no true gain in {pays:.1%} (n = {n})"
    assert enough <= 0.05, f"'frozen is enough' with a true gain equal to the margin in {enough:.1%} (n = {n})"
