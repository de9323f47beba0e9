"""The paired verdict: every row of a dataset against its best row, image by image, with the compute it cost.

Rows of one comparison are tested on the same images (the split plan), so their differences are paired: for
each image both rows are right, both wrong, or one of them right. Two tests use that pairing (Dietterich 1998):

- the **exact McNemar test**: under "no difference", the images only one row gets right fall to either row with
  probability 1/2, so the two-sided p-value is a binomial test on the discordant counts;
- the **paired bootstrap**: test images are resampled with replacement, the same resample for both rows, and the
  2.5 and 97.5 percentiles of the accuracy difference give its 95 % interval.

Comparing every row with the best one is a family of tests, so the p-values are Holm-adjusted (Holm 1979). The
best row is itself picked on these test images, which makes its lead slightly optimistic; the report says so. The
question featx exists to answer — is an SVM on frozen features enough, or must I fine-tune? — gets a sentence of its
own (the best fine-tuned row against the best frozen row) with its own, unadjusted p-value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ALPHA",
    "DatasetVerdict",
    "PairedComparison",
    "holm",
    "mcnemar_exact",
    "paired_bootstrap_ci",
    "resolvable",
    "verdict",
]

#: The significance level of every sentence the verdict writes.
ALPHA = 0.05


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int, float]:
    """The exact (binomial) McNemar test of two classifiers scored on the same images.

    Parameters
    ----------
    a_correct, b_correct : sequence of bool
        Whether each row got each image right, aligned image by image.

    Returns
    -------
    only_a : int
        Images only ``a`` got right.
    only_b : int
        Images only ``b`` got right.
    p_value : float
        Two-sided; 1.0 when no image is discordant.
    """
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results must cover the same images: {a.size} against {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap_ci(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``accuracy(a) - accuracy(b)``, resampling images for both rows at once.

    Parameters
    ----------
    a_correct, b_correct : sequence of bool
        Whether each row got each image right, aligned image by image.
    n_resamples : int, default=10_000
    level : float, default=0.95
    seed : int, default=0
    """
    from featx.metrics import bootstrap_mean_ci

    diff = np.asarray(a_correct, dtype=np.float64) - np.asarray(b_correct, dtype=np.float64)
    return bootstrap_mean_ci(diff, n_resamples, level, seed)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given; each capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[i]))  # monotone: never below an earlier step
        adjusted[i] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class PairedComparison:
    """One row against the reference row (the best of its dataset), on the same test images."""

    method: str
    accuracy: float
    difference: float  # accuracy(row) - accuracy(reference)
    ci95: tuple[float, float]  # paired bootstrap interval of the difference
    only_reference_right: int
    only_row_right: int
    p_value: float  # exact McNemar, two-sided
    p_holm: float | None  # Holm-adjusted over the rows of the dataset (None for the reference itself)
    compute_seconds: float | None  # extraction + training
    cost_ratio: float | None  # compute_seconds / the reference's
    device: str | None = None  # where the row computed (cpu, cuda:0, …): a ratio across devices says so


@dataclass
class DatasetVerdict:
    """The paired verdict of one dataset: every comparable row against the best, and what it means in words."""

    dataset: str
    reference: str  # the best row's method
    n_test: int
    rows: list[PairedComparison]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (method, why it is not in the table)
    sentences: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The verdict as JSON-ready data (for report.json)."""
        return {
            "dataset": self.dataset,
            "reference": self.reference,
            "n_test": self.n_test,
            "rows": [vars(r) for r in self.rows],
            "refused": [{"method": m, "why": w} for m, w in self.refused],
            "sentences": self.sentences,
        }


# --------------------------------------------------------------------------------------------- verdict
def verdict(rows: Sequence[Mapping[str, Any]], *, n_resamples: int = 10_000, seed: int = 0) -> DatasetVerdict | None:
    """The paired verdict of one dataset's rows (see the module docstring).

    Parameters
    ----------
    rows : sequence of mapping
        The report's rows of one dataset: ``method``, ``dataset``, ``kind`` (``classifier``/``finetune``),
        ``baseline`` (bool), ``accuracy``, ``predictions`` (``{"ids", "true", "predicted"}``), ``compute_s``.
    n_resamples, seed :
        Of the paired bootstrap.

    Returns
    -------
    DatasetVerdict or None
        ``None`` when no row was scored on a test split; without per-image predictions, a verdict that
        names the rows and says so.
    """
    usable, refused = _comparable(rows)
    if not usable:
        if not refused:
            return None
        dataset = str(rows[0].get("dataset"))
        return DatasetVerdict(
            dataset, "", 0, [], refused, ["no paired verdict: no row has per-image test predictions."]
        )
    reference = max(usable, key=_rank)
    ids = sorted(reference["predictions"]["ids"])
    correct = {r["method"]: _correct_by_id(r, ids) for r in usable}
    comparisons = [_compare(r, reference, correct, n_resamples, seed) for r in usable]
    others = [c for c in comparisons if c.method != reference["method"]]
    adjusted = dict(zip([c.method for c in others], holm([c.p_value for c in others]), strict=True))
    comparisons = [_with_holm(c, adjusted.get(c.method)) for c in comparisons]
    comparisons.sort(key=lambda c: -c.accuracy)
    result = DatasetVerdict(str(reference.get("dataset")), reference["method"], len(ids), comparisons, refused)
    result.sentences = _sentences(usable, comparisons, reference, correct, n_resamples, seed)
    return result


def _rank(row: Mapping[str, Any]) -> tuple[float, float]:
    """The one rule for "best": the highest test accuracy; on a tie, the smaller compute (unknown: last)."""
    cost = row.get("compute_s")
    return (row["accuracy"], -(cost if cost is not None else math.inf))


def _comparable(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[tuple[str, str]]]:
    """The rows scored on one set of test images with the same labels, and the others with why they are left out.

    Rows are grouped by their test images and labels; the largest group is compared (on a tie, the one holding
    the best row), so a stale result from another split plan can never push the others out.
    """
    refused: list[tuple[str, str]] = []
    groups: dict[frozenset, list[Mapping[str, Any]]] = {}
    for r in rows:
        p = r.get("predictions")
        if not p or not p.get("ids"):
            if r.get("accuracy") is not None:
                refused.append((r["method"], "no per-image test predictions (written by an older featx): re-run it"))
            continue
        groups.setdefault(frozenset(zip(p["ids"], p["true"], strict=True)), []).append(r)
    if not groups:
        return [], refused
    key = max(groups, key=lambda k: (len(groups[k]), max(_rank(r) for r in groups[k])))
    usable, reference = groups[key], max(groups[key], key=_rank)
    ids = {i for i, _ in key}
    for other, members in groups.items():
        if other is key:
            continue
        theirs = {i for i, _ in other}
        why = (
            f"tested on other images than {reference['method']} ({len(theirs)} against {len(ids)}, "
            f"{len(theirs ^ ids)} not shared): rows are compared only under one split plan"
            if theirs != ids
            else f"its test images carry other labels than {reference['method']}'s: re-run it on today's labels"
        )
        refused += [(r["method"], why) for r in members]
    return usable, refused


def _correct_by_id(row: Mapping[str, Any], ids: Sequence[str]) -> np.ndarray:
    p = row["predictions"]
    right = {i: t == y for i, t, y in zip(p["ids"], p["true"], p["predicted"], strict=True)}
    return np.array([right[i] for i in ids], dtype=bool)


def _compare(
    row: Mapping[str, Any],
    reference: Mapping[str, Any],
    correct: dict[str, np.ndarray],
    n_resamples: int,
    seed: int,
) -> PairedComparison:
    mine, theirs = correct[row["method"]], correct[reference["method"]]
    only_ref, only_row, p = mcnemar_exact(theirs, mine)
    lo, hi = paired_bootstrap_ci(mine, theirs, n_resamples=n_resamples, seed=seed)
    cost, ref_cost = row.get("compute_s"), reference.get("compute_s")
    return PairedComparison(
        method=row["method"],
        accuracy=float(mine.mean()),
        difference=float(mine.mean() - theirs.mean()),
        ci95=(lo, hi),
        only_reference_right=only_ref,
        only_row_right=only_row,
        p_value=p,
        p_holm=None,
        compute_seconds=cost,
        cost_ratio=cost / ref_cost if cost and ref_cost else None,
        device=row.get("device"),
    )


def _with_holm(c: PairedComparison, p_holm: float | None) -> PairedComparison:
    return PairedComparison(**{**vars(c), "p_holm": p_holm})


# ------------------------------------------------------------------------------------------- sentences
def _pt(x: float) -> str:
    return f"{100 * x:+.1f} pt"


def _ci_pt(ci: tuple[float, float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def _cost(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f", at {ratio:.3g}× the compute" if ratio >= 1 else f", at 1/{1 / ratio:.3g} of the compute"


def _sentences(
    usable: Sequence[Mapping[str, Any]],
    comparisons: list[PairedComparison],
    reference: Mapping[str, Any],
    correct: dict[str, np.ndarray],
    n_resamples: int,
    seed: int,
) -> list[str]:
    """Plain sentences: the rows against the best, the users' question, and what transfer buys over a baseline."""
    n = len(next(iter(correct.values())))
    others = [c for c in comparisons if c.method != reference["method"]]
    worse = [c for c in others if c.p_holm is not None and c.p_holm < ALPHA]
    out = []
    if not others:
        out.append(f"one comparable row only ({reference['method']}, n = {n} test images).")
    elif not worse:
        out.append(
            f"no row differs significantly from the best ({reference['method']}) at this test size (n = {n}; "
            f"Holm-adjusted McNemar, α = {ALPHA:g}): differences under ~{100 * resolvable(others, n):.1f} pt "
            "cannot be resolved with these images."
        )
    else:
        tied = [c.method for c in others if c not in worse]
        out.append(
            f"{reference['method']} is best; {len(worse)} of {len(others)} other rows score significantly lower "
            f"(Holm-adjusted McNemar, α = {ALPHA:g})" + (f"; not resolved from it: {', '.join(tied)}." if tied else ".")
        )
    frozen = [r for r in usable if r.get("kind") == "classifier" and not r.get("baseline")]
    tuned = [r for r in usable if r.get("kind") == "finetune"]
    if frozen and tuned:
        out.append(_question(_best(tuned), _best(frozen), correct, n_resamples, seed))
    baselines = [r for r in usable if r.get("baseline")]
    transfer = [r for r in usable if not r.get("baseline")]
    if baselines and transfer:
        out.append(_over_baseline(_best(transfer), _best(baselines), correct, n_resamples, seed))
    if others:
        out.append(
            "(the best rows are picked on these same test images, so their leads are slightly optimistic; "
            "each p-value assumes the compared rows were named in advance.)"
        )
    return out


def resolvable(comparisons: Sequence[PairedComparison], n: int) -> float:
    """About the smallest accuracy difference the Holm-adjusted McNemar tests could call significant.

    Parameters
    ----------
    comparisons : sequence of PairedComparison
        The rows compared with the best (``m`` of them: Holm's first step tests at ``ALPHA / m``).
    n : int
        Paired test images.

    Returns
    -------
    float
        Of ``d`` images on which two rows disagree, the test needs the split to be lopsided by about
        ``z * sqrt(d)`` (its normal approximation, ``z`` the two-sided quantile at ``ALPHA / m``), i.e. an accuracy
        difference of ``z * sqrt(d) / n``, ``d`` the most discordant row's; never below what the exact test needs
        when every discordant image favours one row (the smallest ``d`` with ``2 * 0.5**d < ALPHA / m``).
    """
    from scipy.stats import norm

    if not n:
        return float("nan")
    level = ALPHA / max(len(comparisons), 1)
    discordant = max((c.only_reference_right + c.only_row_right for c in comparisons), default=0)
    smallest = next(d for d in range(1, 200) if 2 * 0.5**d < level)
    return max(float(norm.ppf(1 - level / 2)) * np.sqrt(discordant) / n, smallest / n)


def _best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return max(rows, key=_rank)


def _paired(a: Mapping[str, Any], b: Mapping[str, Any], correct, n_resamples: int, seed: int):
    ca, cb = correct[a["method"]], correct[b["method"]]
    _, _, p = mcnemar_exact(ca, cb)
    ci = paired_bootstrap_ci(ca, cb, n_resamples=n_resamples, seed=seed)
    cost = a.get("compute_s") / b["compute_s"] if a.get("compute_s") and b.get("compute_s") else None
    return float(ca.mean() - cb.mean()), ci, p, cost


def _question(tuned, frozen, correct, n_resamples: int, seed: int) -> str:
    """Is the best frozen row enough, or must one fine-tune? Its own p-value (not in the Holm family)."""
    t = tuned["method"] + (", kept at epoch 0" if tuned.get("chosen") == "best epoch 0" else "")
    return _versus(
        tuned, frozen, f"fine-tuning ({t})", f"the best frozen row ({frozen['method']})", correct, n_resamples, seed
    )


def _over_baseline(transfer, baseline, correct, n_resamples: int, seed: int) -> str:
    """What transfer buys: the best row with a pretrained network against the best row without one."""
    return _versus(
        transfer,
        baseline,
        f"transfer ({transfer['method']})",
        f"no transfer ({baseline['method']})",
        correct,
        n_resamples,
        seed,
    )


def _versus(a, b, a_words: str, b_words: str, correct, n_resamples: int, seed: int) -> str:
    """One sentence on ``a`` against ``b``, paired: which wins and by how much, or that they cannot be told apart."""
    diff, ci, p, cost = _paired(a, b, correct, n_resamples, seed)
    if p >= ALPHA:
        return (
            f"{a_words} against {b_words}: {_pt(diff)} {_ci_pt(ci)}, {_p(p)} — no significant difference at "
            f"n = {len(correct[a['method']])} test images{_cost(cost)}."
        )
    if diff > 0:
        return f"{a_words} beats {b_words} by {_pt(diff)} {_ci_pt(ci)}, {_p(p)}{_cost(cost)}."
    gap, cheaper = f"{_pt(-diff)} {_ci_pt((-ci[1], -ci[0]))}", _cost(1 / cost if cost else None)
    return f"{b_words} beats {a_words} by {gap}, {_p(p)}{cheaper}."
