"""The verdict: the decision with a margin, chosen on val, over seeds and splits; exact McNemar, Holm, Tango."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from featx.jobs.decision import outcome_of, paired_score_interval, resolvable_difference
from featx.jobs.verdict import across_datasets, holm, mcnemar_exact, verdict


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


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def _row(method, correct, *, kind="classifier", baseline=False, seconds=1.0, ids=None, val=None, seed=0, split=0):
    ids = ids or [f"img{i:03d}" for i in range(len(correct))]
    return {
        "method": method,
        "row_key": method,
        "dataset": "d",
        "kind": kind,
        "baseline": baseline,
        "seed": seed,
        "accuracy": float(np.mean(correct)),
        "val_accuracy": float(np.mean(correct)) if val is None else val,
        "compute_s": seconds,
        "split": {"plan": {"split_seed": split}, "sizes": {"train": 600, "val": 150, "test": len(ids)}},
        "predictions": {"ids": ids, "true": [1] * len(ids), "predicted": [1 if c else 0 for c in correct]},
    }


def test_tango_interval_covers_and_never_collapses():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(1500):
        u = rng.random(150)
        b, c = int((u < 0.06).sum()), int(((u >= 0.06) & (u < 0.10)).sum())
        lo, hi = paired_score_interval(b, c, 150)
        covered += lo <= 0.02 <= hi
    assert 0.93 <= covered / 1500 <= 0.97
    lo, hi = paired_score_interval(0, 0, 100)  # no discordant image: an interval around 0, not [0, 0]
    assert lo == pytest.approx(-hi) and 0.02 < hi < 0.05
    lo, hi = paired_score_interval(6, 0, 153)  # agrees with the exact test: 6 : 0 is resolved
    assert lo > 0


def test_resolvable_difference_is_the_exact_tests():
    # the cases: 11 discordant images need 10 : 1 (5.9 pt of 153), a 6 : 0 split is enough (p = 0.031)
    assert resolvable_difference(11, 153, 0.05) == pytest.approx(9 / 153)
    assert resolvable_difference(6, 153, 0.05) == pytest.approx(6 / 153)
    assert resolvable_difference(5, 153, 0.05) is None  # 5 : 0 has p = 0.0625


@pytest.mark.parametrize(
    ("low", "high", "outcome"),
    [
        (0.02, 0.05, "pays"),
        (0.001, 0.03, "pays"),
        (-0.03, 0.009, "enough"),
        (0.001, 0.009, "enough"),
        (-0.05, -0.01, "better"),
        (-0.02, 0.02, "inconclusive"),
    ],
)
def test_outcomes_read_the_interval_against_the_margin(low, high, outcome):
    assert outcome_of(low, high, 0.01) == outcome


def test_the_reference_and_the_questions_rows_are_chosen_on_val_never_on_test():
    a, b = _pair(120, 14, 4, 15)  # a is ahead on test by 10 images
    rows = [_row("svm", a, val=0.80), _row("logreg", b, val=0.90, seconds=0.5)]
    found = verdict(rows)
    assert found.reference == "logreg"  # best on val, though svm is best on test
    assert "Reference: logreg, best on val (90.0 %)" in found.sentences[-1]
    tied = verdict([_row("svm", a, val=0.9, seconds=5.0), _row("logreg", b, val=0.9, seconds=0.5)])
    assert tied.reference == "logreg"  # a tie on val goes to the cheaper row


def test_verdict_decides_fine_tuning_pays_with_its_cost_and_refuses_other_test_images():
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
    assert found.question.outcome == "pays" and found.question.above_margin
    assert found.headline.startswith("Fine-tuning pays: finetune beats the best frozen row (svm) by +11.1 pt")
    assert "by more than the 1 pt margin, at 40× the compute." in found.headline
    assert "Not counted: training-seed variance" in found.sentences[1]
    assert found.transfer.outcome == "pays"


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


def test_no_significant_difference_is_never_the_answer_an_inconclusive_case_says_what_would_decide():
    tuned, frozen = _pair(130, 6, 8, 9)  # -1.3 pt on 153 images: spans 0 and the margin
    found = verdict([_row("svm", frozen, seconds=2.0), _row("ft", tuned, kind="finetune", seconds=50.0)])
    d = found.question
    assert d.outcome == "inconclusive" and d.interval[0] < 0 < 0.01 < d.interval[1]
    assert found.headline.startswith("Inconclusive whether fine-tuning pays: ft against svm is -1.3 pt")
    assert "spans both 0 and the 1 pt margin, at 25× the compute" in found.headline
    assert "test images (now 153) would decide it" in found.headline
    enough = verdict(
        [_row("svm", np.r_[frozen, [True] * 3000]), _row("ft", np.r_[tuned, [True] * 3000], kind="finetune")]
    )
    assert enough.question.outcome == "enough"  # the same gap on many more images: below the margin
    assert enough.headline.startswith("The frozen row is enough: fine-tuning (ft) against svm is -0.1 pt")
    old = verdict([{**_row("x", frozen), "predictions": None}])
    assert old.rows == [] and old.refused[0][0] == "x" and "no paired verdict" in old.sentences[0]
    assert verdict([{**_row("x", frozen), "predictions": None, "accuracy": None}]) is None


def test_seeds_are_averaged_and_repeats_give_the_bayesian_probabilities():
    rng = np.random.default_rng(3)
    rows = []
    for split in range(3):
        ids = [f"s{split}-{i}" for i in range(300)]
        rows.append(_row("svm", rng.random(300) < 0.85, ids=ids, split=split))
        for seed in range(3):
            rows.append({**_row("ft", rng.random(300) < 0.90, kind="finetune", ids=ids, split=split), "seed": seed})
    found = verdict(rows)
    d = found.question
    assert d.splits == 3 and d.seeds == (3, 1) and not d.not_counted
    assert sum(d.probabilities.values()) == pytest.approx(1.0)
    assert d.probabilities["a_better"] > 0.5 and "Nadeau & Bengio" in d.method
    one_split = verdict([r for r in rows if r["split"]["plan"]["split_seed"] == 0])
    assert one_split.question.seeds == (3, 1) and one_split.question.splits == 1
    assert "run-averaged" in one_split.question.method  # all three seeds, not the lowest alone


def test_across_datasets_counts_decisions_and_tests_the_differences():
    tuned, frozen = _pair(120, 20, 3, 10)
    found = [verdict([_row("svm", frozen), _row("ft", tuned, kind="finetune")]) for _ in range(3)]
    (line,) = across_datasets(found)
    assert line.startswith("Across 3 datasets: fine-tuning pays on 3; Wilcoxon signed-rank")
    assert across_datasets(found[:2]) == []


def test_repeats_around_a_fixed_test_split_count_as_training_runs_and_say_what_they_cannot_count():
    rng = np.random.default_rng(5)
    ids = [f"val/{i}" for i in range(150)]  # a folder's own val split is the test split, whatever the split seed
    rows = []
    for split in range(3):
        rows.append(_row("svm", rng.random(150) < 0.85, ids=ids, split=split))
        rows.append(_row("ft", rng.random(150) < 0.88, kind="finetune", ids=ids, split=split))
    d = verdict(rows).question
    assert d.splits == 1 and d.fixed_test_repeats == 3 and d.seeds == (3, 3)
    words = " ".join(verdict(rows).sentences)
    assert "3 split seeds re-carving train and val around the same test images" in words
    assert "the test split's own variance" in words and "split-to-split" not in words
