"""The paired verdict: every row of a dataset against its best row, image by image, with the compute it cost.

Rows of one comparison are tested on the same images (the split plan), so their differences are paired: for
each image both rows are right, both wrong, or one of them right. Two tests use that pairing (Dietterich 1998):

- the **exact McNemar test**: under "no difference", the images only one row gets right fall to either row with
  probability 1/2, so the two-sided p-value is a binomial test on the discordant counts;
- the **paired bootstrap**: test images are resampled with replacement, the same resample for both rows, and the
  2.5 and 97.5 percentiles of the accuracy difference give its 95 % interval.

Comparing every row with the best one is a family of tests, so the p-values are Holm-adjusted (Holm 1979). The
question featx exists to answer — is an SVM on frozen features enough, or must I fine-tune? — is one planned
comparison (the best fine-tuned row against the best frozen row), reported with its own unadjusted p-value.
"""

from __future__ import annotations

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
    reference = max(usable, key=lambda r: (r["accuracy"], -(r.get("compute_s") or 0.0)))
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


def _comparable(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[tuple[str, str]]]:
    """The rows with per-image predictions on one set of test images (the best row's), and the others with why."""
    refused: list[tuple[str, str]] = []
    scored = []
    for r in rows:
        predictions = r.get("predictions")
        if not predictions or not predictions.get("ids"):
            if r.get("accuracy") is not None:
                refused.append((r["method"], "no per-image test predictions (written by an older featx): re-run it"))
            continue
        scored.append(r)
    if not scored:
        return [], refused
    best = max(scored, key=lambda r: r["accuracy"])
    reference_ids = set(best["predictions"]["ids"])
    usable = []
    for r in scored:
        ids = set(r["predictions"]["ids"])
        if ids != reference_ids:
            refused.append(
                (
                    r["method"],
                    f"tested on other images than {best['method']} ({len(ids)} against {len(reference_ids)}, "
                    f"{len(ids ^ reference_ids)} not shared): rows are compared only under one split plan",
                )
            )
            continue
        usable.append(r)
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
    return out


def resolvable(comparisons: Sequence[PairedComparison], n: int) -> float:
    """About the smallest accuracy difference a McNemar test could call significant on ``n`` paired images.

    Of ``d`` images on which two rows disagree, the test needs the split to be lopsided by about
    ``1.96 * sqrt(d)`` (its normal approximation), i.e. an accuracy difference of ``1.96 * sqrt(d) / n``; ``d`` is
    taken as the most discordant row's. Never below what the exact test needs when every discordant image
    favours one row (6 images at α = 0.05, since 2 · 0.5**6 < 0.05).
    """
    discordant = max((c.only_reference_right + c.only_row_right for c in comparisons), default=0)
    smallest = next(d for d in range(1, 64) if 2 * 0.5**d < ALPHA)
    return max(1.96 * np.sqrt(discordant) / n, smallest / n) if n else float("nan")


def _best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return max(rows, key=lambda r: r["accuracy"])


def _paired(a: Mapping[str, Any], b: Mapping[str, Any], correct, n_resamples: int, seed: int):
    ca, cb = correct[a["method"]], correct[b["method"]]
    _, _, p = mcnemar_exact(ca, cb)
    ci = paired_bootstrap_ci(ca, cb, n_resamples=n_resamples, seed=seed)
    cost = a.get("compute_s") / b["compute_s"] if a.get("compute_s") and b.get("compute_s") else None
    return float(ca.mean() - cb.mean()), ci, p, cost


def _question(tuned, frozen, correct, n_resamples: int, seed: int) -> str:
    """Is the best frozen row enough, or must one fine-tune? One planned comparison, so its p is unadjusted."""
    diff, ci, p, cost = _paired(tuned, frozen, correct, n_resamples, seed)
    t, f = tuned["method"], frozen["method"]
    if tuned.get("chosen") == "best epoch 0":  # no update beat its start on val: the row is its starting point
        t += ", kept at epoch 0"
    if p < ALPHA and diff > 0:
        return f"fine-tuning ({t}) beats the best frozen row ({f}) by {_pt(diff)} {_ci_pt(ci)}, {_p(p)}{_cost(cost)}."
    if p < ALPHA:
        gap, cheaper = f"{_pt(-diff)} {_ci_pt((-ci[1], -ci[0]))}", _cost(1 / cost if cost else None)
        return f"the best frozen row ({f}) beats fine-tuning ({t}) by {gap}, {_p(p)}{cheaper}."
    n = len(correct[f])
    return (
        f"fine-tuning ({t}) against the best frozen row ({f}): {_pt(diff)} {_ci_pt(ci)}, {_p(p)} — no significant "
        f"difference at n = {n} test images (fine-tuning{_cost(cost)})."
    )


def _over_baseline(transfer, baseline, correct, n_resamples: int, seed: int) -> str:
    """What transfer buys: the best row with a pretrained network against the best row without one."""
    diff, ci, p, cost = _paired(transfer, baseline, correct, n_resamples, seed)
    t, b = transfer["method"], baseline["method"]
    if p >= ALPHA:
        return (
            f"transfer ({t}) against no transfer ({b}): {_pt(diff)} {_ci_pt(ci)}, {_p(p)} — no significant "
            f"difference at n = {len(correct[t])} test images (transfer{_cost(cost)})."
        )
    if diff > 0:
        gap = f"{_pt(diff)} {_ci_pt(ci)}"
        return f"transfer pays: {t} beats the best no-transfer row ({b}) by {gap}, {_p(p)}{_cost(cost)}."
    gap, cheaper = f"{_pt(-diff)} {_ci_pt((-ci[1], -ci[0]))}", _cost(1 / cost if cost else None)
    return (
        f"transfer does not pay here: the no-transfer row {b} beats the best transfer row ({t}) by {gap}, "
        f"{_p(p)}{cheaper}."
    )
