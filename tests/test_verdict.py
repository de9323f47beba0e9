"""The paired verdict: exact McNemar, paired bootstrap, Holm, and the sentences a report opens with."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from featx.jobs.verdict import holm, mcnemar_exact, paired_bootstrap_ci, resolvable, verdict


def _exact_mcnemar_by_hand(only_a: int, only_b: int) -> float:
    """Twice the smaller binomial tail of the discordant counts, computed term by term."""
    d = only_a + only_b
    tail = sum(comb(d, k) for k in range(min(only_a, only_b) + 1)) / 2**d
    return min(1.0, 2 * tail)


def _pair(n_both: int, only_a: int, only_b: int, n_neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * n_both + [True] * only_a + [False] * only_b + [False] * n_neither
    b = [True] * n_both + [False] * only_a + [True] * only_b + [False] * n_neither
    return np.array(a), np.array(b)


@pytest.mark.parametrize(("only_a", "only_b"), [(10, 2), (2, 10), (7, 7), (1, 0), (0, 0), (30, 12)])
def test_mcnemar_is_the_exact_binomial_test(only_a, only_b):
    from scipy.stats import binomtest

    a, b = _pair(50, only_a, only_b, 5)
    found_a, found_b, p = mcnemar_exact(a, b)
    assert (found_a, found_b) == (only_a, only_b)
    assert p == pytest.approx(_exact_mcnemar_by_hand(only_a, only_b), rel=1e-9)
    if only_a + only_b:
        assert p == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-12)
    with pytest.raises(ValueError, match="same images"):
        mcnemar_exact(a, b[:-1])


def test_paired_bootstrap_matches_a_direct_computation_and_uses_the_pairing():
    a, b = _pair(120, 14, 4, 15)  # a: +10 images of 153
    lo, hi = paired_bootstrap_ci(a, b, n_resamples=4000, seed=1)
    rng = np.random.default_rng(7)
    direct = []
    for _ in range(4000):  # resample images, the same ones for both rows
        idx = rng.integers(0, a.size, a.size)
        direct.append(a[idx].mean() - b[idx].mean())
    d_lo, d_hi = np.percentile(direct, [2.5, 97.5])
    assert lo == pytest.approx(d_lo, abs=0.01) and hi == pytest.approx(d_hi, abs=0.01)
    assert lo < (a.mean() - b.mean()) < hi and lo > 0  # 14 against 4 discordant: resolved
    # Unpaired, the same accuracies could not be told apart: the pairing is what narrows the interval.
    unpaired = [
        a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean() for _ in range(2000)
    ]
    assert np.percentile(unpaired, 2.5) < 0 < np.percentile(unpaired, 97.5)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def _row(method, correct, *, kind="classifier", baseline=False, seconds=1.0, ids=None):
    ids = ids or [f"img{i:03d}" for i in range(len(correct))]
    return {
        "method": method,
        "dataset": "d",
        "kind": kind,
        "baseline": baseline,
        "accuracy": float(np.mean(correct)),
        "compute_s": seconds,
        "predictions": {"ids": ids, "true": [1] * len(ids), "predicted": [1 if c else 0 for c in correct]},
    }


def test_verdict_says_fine_tuning_wins_when_it_does_and_refuses_other_test_images():
    tuned, frozen = _pair(120, 20, 3, 10)
    pixels = np.array([True] * 60 + [False] * 93)
    rows = [
        _row("svm", frozen, seconds=10.0),
        _row("finetune", tuned, kind="finetune", seconds=400.0),
        _row("pixels · logreg", pixels, baseline=True, seconds=2.0),
        _row("other split", tuned, ids=[f"x{i}" for i in range(153)]),
        {**_row("old", tuned), "predictions": None},
    ]
    found = verdict(rows)
    assert found.reference == "finetune" and found.n_test == 153
    assert [c.method for c in found.rows] == ["finetune", "svm", "pixels · logreg"]
    svm = found.rows[1]
    assert (svm.only_reference_right, svm.only_row_right) == (20, 3)
    assert svm.difference == pytest.approx(-17 / 153) and svm.cost_ratio == pytest.approx(10 / 400)
    pixels_row = found.rows[2]  # the smaller p of the two is doubled, the larger kept (Holm's steps, monotone)
    assert pixels_row.p_holm == pytest.approx(2 * pixels_row.p_value)
    assert svm.p_holm == pytest.approx(max(svm.p_value, 2 * pixels_row.p_value))
    assert {m for m, _ in found.refused} == {"other split", "old"}
    assert "tested on other images" in dict(found.refused)["other split"]
    sentences = " ".join(found.sentences)
    assert "fine-tuning (finetune) beats the best frozen row (svm) by +11.1 pt" in sentences
    assert "at 40× the compute" in sentences
    assert "transfer (finetune) beats no transfer (pixels · logreg) by +" in sentences
    assert "picked on these same test images, so their leads are slightly optimistic" in sentences


def test_a_stale_row_never_pushes_the_comparable_rows_out_and_other_labels_are_refused():
    tuned, frozen = _pair(120, 20, 3, 10)
    stale = _row("stale, other split", np.ones(100, dtype=bool), ids=[f"x{i}" for i in range(100)])  # scores 1.0
    relabelled = _row("relabelled", frozen)
    relabelled["predictions"] = {**relabelled["predictions"], "true": [0] * 153}  # same images, other labels
    found = verdict([stale, _row("svm", frozen), _row("finetune", tuned, kind="finetune"), relabelled])
    assert found.reference == "finetune" and [c.method for c in found.rows] == ["finetune", "svm"]
    refused = dict(found.refused)
    assert "tested on other images than finetune" in refused["stale, other split"]
    assert "other labels" in refused["relabelled"]


def test_verdict_says_when_the_test_set_cannot_separate_the_rows():
    a, b = _pair(140, 3, 2, 8)
    found = verdict([_row("svm", a), _row("logreg", b)])
    sentence = found.sentences[0]
    assert sentence.startswith("no row differs significantly from the best (svm) at this test size (n = 153")
    others = [c for c in found.rows if c.method != found.reference]
    assert f"~{100 * resolvable(others, 153):.1f} pt" in sentence
    assert resolvable(others, 153) == pytest.approx(6 / 153)  # 5 discordant images: the exact floor rules
    # With more rows, Holm's first step tests at α/m: both the floor and the normal quantile grow.
    many = [found.rows[1]] * 8
    assert resolvable(many, 153) == pytest.approx(max(2.7344 * np.sqrt(5) / 153, 9 / 153), rel=1e-3)
    old = verdict([{**_row("x", a), "predictions": None}])
    assert old.rows == [] and old.refused[0][0] == "x" and "no paired verdict" in old.sentences[0]
    assert verdict([{**_row("x", a), "predictions": None, "accuracy": None}]) is None
