"""The verdict of one dataset: the decision the users came for, then every row against the reference, paired.

Rows of one comparison are tested on the same images (the split plan), so their differences are paired: for each
image both rows are right, both wrong, or one of them right (Dietterich 1998).

1. **Chosen on val, tested once.** The reference row, the best frozen row, the best fine-tuned row, the best
   transfer row and the best no-transfer row are each the one with the best *val* score (ties to the cheaper row).
   Test accuracy only scores them, so the tests below hold at their level (picking the reference on test and then
   testing against it does not: see ``tests/jobs/test_verdict_calibration.py``).
2. **The decision** (:mod:`featx.jobs.decision`): the best fine-tuned row against the best frozen row, read against
   a margin of practical equivalence, over every split (``repeats``) and training seed the two rows were run with;
   likewise transfer against no transfer.
3. **Every row against the reference**, the secondary view: the exact McNemar test (a binomial test on the images
   only one row gets right), Holm-adjusted over the rows (Holm 1979), Tango's score interval of the difference
   (unadjusted, and labelled so), the smallest difference the row's own discordant images could resolve, and the
   compute each row cost.

Compute is one thing everywhere: extraction + fitting (the hyper-parameter search and the learning-rate choice
included, evaluation excluded); an LP-FT row includes its probe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featx.jobs.decision import DEFAULT_MARGIN, Decision, decide, paired_score_interval, resolvable_difference

__all__ = [
    "ALPHA",
    "DatasetVerdict",
    "PairedComparison",
    "across_datasets",
    "cost_words",
    "decision_sentence",
    "holm",
    "mcnemar_exact",
    "split_seed_of",
    "two_figures",
    "verdict",
]

#: The significance level of the secondary table's tests.
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
    """One row against the reference row (the best on val), on the same test images (one run: its lowest seed)."""

    method: str
    accuracy: float  # on the first split, its seeds averaged
    difference: float  # accuracy(row) - accuracy(reference), lowest seed of each
    ci95: tuple[float, float]  # Tango's score interval of the difference, unadjusted
    only_reference_right: int
    only_row_right: int
    p_value: float  # exact McNemar, two-sided
    p_holm: float | None  # Holm-adjusted over the rows of the dataset (None for the reference itself)
    resolvable: float | None  # the smallest difference its discordant images could resolve at ALPHA / m
    compute_seconds: float | None  # extraction + fitting (search, rate choice, an LP-FT's probe)
    cost_ratio: float | None  # compute_seconds / the reference's
    device: str | None = None  # where the row computed (cpu, cuda:0, …): a ratio across devices says so
    val_accuracy: float | None = None  # the val score the row was chosen by (seeds averaged)
    seeds: int = 1


@dataclass
class DatasetVerdict:
    """The verdict of one dataset: the decision, every comparable row against the reference, and its words."""

    dataset: str
    reference: str  # the method with the best val score
    n_test: int
    rows: list[PairedComparison]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (method, why it is not in the table)
    sentences: list[str] = field(default_factory=list)
    margin: float = DEFAULT_MARGIN
    splits: int = 1
    question: Decision | None = None  # best fine-tuned against best frozen
    question_rows: tuple[str, str] | None = None  # (tuned, frozen) methods
    transfer: Decision | None = None  # best transfer against best no-transfer row
    transfer_rows: tuple[str, str] | None = None
    question_kept_at_start: bool = False  # the fine-tuned row never left its starting point (an LP-FT's folded probe)
    headline: str = ""  # the decision in one sentence (the report opens with it)

    def to_dict(self) -> dict[str, Any]:
        """The verdict as JSON-ready data (for report.json)."""
        return {
            "dataset": self.dataset,
            "reference": self.reference,
            "chosen_on": "val",
            "n_test": self.n_test,
            "margin": self.margin,
            "splits": self.splits,
            "headline": self.headline,
            "question": None if self.question is None else {"rows": self.question_rows, **self.question.to_dict()},
            "transfer": None if self.transfer is None else {"rows": self.transfer_rows, **self.transfer.to_dict()},
            "rows": [vars(r) for r in self.rows],
            "refused": [{"method": m, "why": w} for m, w in self.refused],
            "sentences": self.sentences,
        }


# --------------------------------------------------------------------------------------------- methods
@dataclass
class _Method:
    """One row of the comparison with its runs: per split, per training seed."""

    name: str
    kind: str
    baseline: bool
    runs: dict[frozenset, list[Mapping[str, Any]]]  # split key -> runs, lowest seed first

    def correct(self, key: frozenset, ids: Sequence[str]) -> list[np.ndarray]:
        return [_correct_by_id(r, ids) for r in self.runs[key]]

    def mean(self, key: frozenset, field_: str) -> float | None:
        values = [r.get(field_) for r in self.runs[key]]
        return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _split_key(run: Mapping[str, Any]) -> frozenset:
    p = run["predictions"]
    return frozenset(zip(p["ids"], p["true"], strict=True))


def _methods(runs: Sequence[Mapping[str, Any]]) -> tuple[list[_Method], list[tuple[str, str]]]:
    refused: list[tuple[str, str]] = []
    by_row: dict[str, _Method] = {}
    for r in runs:
        p = r.get("predictions")
        if not p or not p.get("ids"):
            if r.get("accuracy") is not None:
                refused.append((r["method"], "no per-image test predictions (written by an older featx): re-run it"))
            continue
        key = r.get("row_key") or r["method"]
        m = by_row.setdefault(key, _Method(r["method"], str(r.get("kind")), bool(r.get("baseline")), {}))
        m.runs.setdefault(_split_key(r), []).append(r)
    for m in by_row.values():
        for group in m.runs.values():
            group.sort(key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
    return list(by_row.values()), refused


def _main_split(methods: list[_Method]) -> frozenset:
    """The split most rows were tested on (on a tie, the one with the lowest split seed)."""
    counts: dict[frozenset, int] = {}
    for m in methods:
        for key in m.runs:
            counts[key] = counts.get(key, 0) + 1
    return max(counts, key=lambda k: (counts[k], -_split_seed(methods, k)))


def _split_seed(methods: list[_Method], key: frozenset) -> int:
    seeds = [split_seed_of(run) for m in methods for run in m.runs.get(key, [])]
    return next((int(s) for s in seeds if s is not None), 0)


def _why_refused(main: frozenset, m: _Method, reference_name: str) -> str:
    ids = {i for i, _ in main}
    theirs = {i for key in m.runs for i, _ in key}
    if theirs == ids:
        return f"its test images carry other labels than {reference_name}'s: re-run it on today's labels"
    return (
        f"tested on other images than {reference_name} ({len(theirs)} against {len(ids)}, "
        f"{len(theirs ^ ids)} not shared): rows are compared only under one split plan"
    )


def _correct_by_id(row: Mapping[str, Any], ids: Sequence[str]) -> np.ndarray:
    p = row["predictions"]
    right = {i: t == y for i, t, y in zip(p["ids"], p["true"], p["predicted"], strict=True)}
    return np.array([right[i] for i in ids], dtype=bool)


def _choose(methods: Sequence[_Method], key: frozenset) -> _Method:
    """The one rule for "best": the highest val score, averaged over the row's seeds and splits (``key``, the first
    split, must be among them); on a tie, the smaller compute. Rows that record no val score come last."""

    def rank(m: _Method) -> tuple[bool, float, float]:
        scores = [m.mean(k, "val_accuracy") for k in m.runs]
        val = float(np.mean(scores)) if m.runs.get(key) and None not in scores else None
        cost = m.mean(key, "compute_s")
        return (val is not None, val if val is not None else -math.inf, -(cost if cost is not None else math.inf))

    return max(methods, key=rank)


# --------------------------------------------------------------------------------------------- verdict
def verdict(runs: Sequence[Mapping[str, Any]], *, margin: float = DEFAULT_MARGIN) -> DatasetVerdict | None:
    """The verdict of one dataset's runs (see the module docstring).

    Parameters
    ----------
    runs : sequence of mapping
        The report's rows of one dataset, one per results file: ``method``, ``row_key`` (the same for the runs of
        one row across training seeds and splits), ``seed``, ``kind`` (``classifier``/``finetune``),
        ``baseline``, ``accuracy``, ``val_accuracy``, ``predictions`` (``{"ids", "true", "predicted"}``),
        ``compute_s``, ``device``, ``split`` (its ``plan`` and ``sizes``).
    margin : float, default=DEFAULT_MARGIN
        The margin of practical equivalence of the decisions (0.01 = 1 pt).

    Returns
    -------
    DatasetVerdict or None
        ``None`` when no row was scored on a test split; without per-image predictions, a verdict that
        names the rows and says so.
    """
    methods, refused = _methods(runs)
    if not methods:
        if not refused:
            return None
        dataset = str(runs[0].get("dataset"))
        return DatasetVerdict(
            dataset, "", 0, [], refused, ["no paired verdict: no row has per-image test predictions."], margin
        )
    main = _main_split(methods)
    usable = [m for m in methods if main in m.runs]
    reference = _choose(usable, main)
    refused += [(m.name, _why_refused(main, m, reference.name)) for m in methods if main not in m.runs]
    ids = sorted(i for i, _ in main)
    rows = _table(usable, reference, main, ids)
    splits = max(len(m.runs) for m in usable)
    found = DatasetVerdict(
        str(reference.runs[main][0].get("dataset")), reference.name, len(ids), rows, refused, [], margin, splits
    )
    frozen = [m for m in usable if m.kind == "classifier" and not m.baseline]
    tuned = [m for m in usable if m.kind == "finetune"]
    if frozen and tuned:
        pair = (_choose(tuned, main), _choose(frozen, main))
        found.question, found.question_rows = _decide(*pair, margin), (pair[0].name, pair[1].name)
        found.question_kept_at_start = _kept_at_start(pair[0])
    transfer, baselines = [m for m in usable if not m.baseline], [m for m in usable if m.baseline]
    if transfer and baselines:
        pair = (_choose(transfer, main), _choose(baselines, main))
        found.transfer, found.transfer_rows = _decide(*pair, margin), (pair[0].name, pair[1].name)
    found.sentences = _sentences(found, reference, main)
    found.headline = found.sentences[0] if found.sentences else ""
    return found


def _table(usable: list[_Method], reference: _Method, main: frozenset, ids: list[str]) -> list[PairedComparison]:
    """Every row against the reference on the first split (each row's lowest seed), Holm-adjusted."""
    theirs = reference.correct(main, ids)[0]
    others = [m for m in usable if m is not reference]
    level = ALPHA / max(len(others), 1)  # Holm's first step: what the family surely resolves
    rows = []
    for m in usable:
        runs = m.correct(main, ids)
        mine = runs[0]
        only_ref, only_row, p = mcnemar_exact(theirs, mine)
        cost, ref_cost = m.mean(main, "compute_s"), reference.mean(main, "compute_s")
        rows.append(
            PairedComparison(
                method=m.name,
                accuracy=float(np.mean([r.mean() for r in runs])),
                difference=float(mine.mean() - theirs.mean()),
                ci95=paired_score_interval(only_row, only_ref, len(ids)),
                only_reference_right=only_ref,
                only_row_right=only_row,
                p_value=p,
                p_holm=None,
                resolvable=resolvable_difference(only_ref + only_row, len(ids), level),
                compute_seconds=cost,
                cost_ratio=cost / ref_cost if cost and ref_cost else None,
                device=m.runs[main][0].get("device"),
                val_accuracy=m.mean(main, "val_accuracy"),
                seeds=len(runs),
            )
        )
    compared = [r for r in rows if r.method != reference.name]
    adjusted = dict(zip([r.method for r in compared], holm([r.p_value for r in compared]), strict=True))
    rows = [PairedComparison(**{**vars(r), "p_holm": adjusted.get(r.method)}) for r in rows]
    rows.sort(key=lambda r: (r.method != reference.name, -(r.val_accuracy or -1.0), -r.accuracy))
    return rows


def _decide(a: _Method, b: _Method, margin: float) -> Decision:
    """``a`` against ``b`` over every split both were run on, their seeds averaged per split."""
    shared = [key for key in a.runs if key in b.runs]
    per_a, per_b, train = {}, {}, {}
    for index, key in enumerate(shared):
        ids = sorted(i for i, _ in key)
        name = f"split {index}"
        per_a[name], per_b[name] = a.correct(key, ids), b.correct(key, ids)
        sizes = (a.runs[key][0].get("split") or {}).get("sizes") or {}
        if sizes.get("train"):
            train[name] = int(sizes["train"]) + int(sizes.get("val") or 0)
    fixed = max(len({split_seed_of(r) for r in (*a.runs[key], *b.runs[key])}) for key in shared)
    decision = decide(
        per_a, per_b, margin=margin, train_sizes=train if len(train) == len(per_a) else None, fixed_test_repeats=fixed
    )
    cost_a, cost_b = _mean_cost(a), _mean_cost(b)
    return dataclasses.replace(decision, cost_ratio=cost_a / cost_b if cost_a and cost_b else None)


def split_seed_of(run: Mapping[str, Any]) -> int | None:
    """The split seed a run was made under (``None`` for results that do not record their plan)."""
    return ((run.get("split") or {}).get("plan") or {}).get("split_seed")


def _kept_at_start(m: _Method) -> bool:
    """No epoch of any run beat the starting point on val: the fine-tuned row is its probe (or the pretrained
    network with a fresh head)."""
    return all(str(r.get("chosen")) == "best epoch 0" for runs in m.runs.values() for r in runs)


def _mean_cost(m: _Method) -> float | None:
    costs = [r.get("compute_s") for runs in m.runs.values() for r in runs]
    return float(np.mean(costs)) if costs and all(c is not None for c in costs) else None


# ------------------------------------------------------------------------------------------- sentences
def _pt(x: float) -> str:
    return f"{100 * x:+.1f} pt"


def _ci_pt(ci: tuple[float, float]) -> str:
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _margin_pt(margin: float) -> str:
    return f"{100 * margin:g} pt"


def cost_words(ratio: float | None) -> str:
    """``12× the compute`` / ``1/8.5 of the compute``, two significant figures; empty when unknown."""
    if ratio is None:
        return ""
    if ratio >= 1:
        return f"{two_figures(ratio)}× the compute"
    return f"1/{two_figures(1 / ratio)} of the compute"


def two_figures(x: float) -> str:
    """A positive number to two significant figures (``2.7``, ``43``, ``1,100``)."""
    return f"{x:.2g}" if x < 100 else f"{round(x, -math.floor(math.log10(x)) + 1):,.0f}"


#: The words of each outcome, for the question (fine-tuning) and for transfer.
_WORDS = {
    "question": {
        "pays": "Fine-tuning pays",
        "enough": "The frozen row is enough",
        "better": "The frozen row is better",
        "inconclusive": "Inconclusive whether fine-tuning pays",
        "a": "fine-tuning",
        "b": "the best frozen row",
    },
    "transfer": {
        "pays": "Transfer pays",
        "enough": "No transfer is enough",
        "better": "No transfer is better",
        "inconclusive": "Inconclusive whether transfer pays",
        "a": "transfer",
        "b": "the best row without transfer",
    },
}


def decision_sentence(d: Decision, a_name: str, b_name: str, which: str = "question") -> str:
    """The decision in one plain sentence: the answer, the difference and its interval against the margin, the cost."""
    w = _WORDS[which]
    gap, ci, margin = _pt(d.difference), _ci_pt(d.interval), _margin_pt(d.margin)
    cost = cost_words(d.cost_ratio)
    cost = f", at {cost}" if cost else ""
    where = f"{d.level:.0%} interval {ci}"
    if d.outcome == "pays":
        by = f"by more than the {margin} margin" if d.above_margin else f"(whether by more than {margin} is unresolved)"
        return f"{w['pays']}: {a_name} beats {w['b']} ({b_name}) by {gap}, {where} {by}{cost}."
    if d.outcome == "enough":
        lead = "a real gain, but" if d.interval[0] > 0 else "any gain is"
        return (
            f"{w['enough']}: {w['a']} ({a_name}) against {b_name} is {gap}, {where}: {lead} smaller than the "
            f"{margin} margin{cost}."
        )
    if d.outcome == "better":
        return f"{w['better']}: {w['a']} ({a_name}) scores {gap} against {b_name}, {where}{cost}."
    return (
        f"{w['inconclusive']}: {a_name} against {b_name} is {gap}, {where}, which spans both 0 and the {margin} "
        f"margin{cost}; {d.to_decide}."
    )


def _variance_sentence(d: Decision) -> str:
    counted = ["the test sample"]
    if d.fixed_test_repeats > 1:
        counted.append(
            f"training runs ({d.seeds[0]} and {d.seeds[1]}: {d.fixed_test_repeats} split seeds re-carving train and "
            "val around the same test images, × training seeds; averaged)"
        )
    elif max(d.seeds) > 1:
        counted.append(f"training seeds ({d.seeds[0]} and {d.seeds[1]}, averaged per split)")
    if d.splits > 1:
        counted.append(f"splits ({d.splits})")
    out = f"Counted: {', '.join(counted)} ({d.method})"
    if d.probabilities:
        p = d.probabilities
        source = "Bayesian correlated t-test" if d.splits > 1 else "normal approximation, flat prior"
        out += (
            f"; {source}: P(fine-tuned better by > {_margin_pt(d.margin)}) = {p['a_better']:.2f}, P(within ±"
            f"{_margin_pt(d.margin)}) = {p['equivalent']:.2f}, P(frozen better by > {_margin_pt(d.margin)}) = "
            f"{p['b_better']:.2f}"
        )
    if d.not_counted:
        out += f". Not counted: {'; '.join(d.not_counted)}"
    return out + "."


def _sentences(found: DatasetVerdict, reference: _Method, main: frozenset) -> list[str]:
    out = []
    if found.question is not None and found.question_rows:
        tuned, frozen = found.question_rows
        if found.question_kept_at_start:
            tuned += " (no epoch beat its starting point on val, so this row is that starting point)"
        out.append(decision_sentence(found.question, tuned, frozen))
        out.append(_variance_sentence(found.question))
    if found.transfer is not None and found.transfer_rows:
        out.append(decision_sentence(found.transfer, *found.transfer_rows, which="transfer"))
    out.append(_table_sentence(found, reference, main))
    return out


def _table_sentence(found: DatasetVerdict, reference: _Method, main: frozenset) -> str:
    val = reference.mean(main, "val_accuracy")
    chosen = f"best on val ({100 * val:.1f} %)" if val is not None else "no row records a val score: the cheapest"
    others = [c for c in found.rows if c.method != found.reference]
    if not others:
        return f"One comparable row only ({found.reference}, {found.n_test} test images)."
    worse = [c for c in others if c.p_holm is not None and c.p_holm < ALPHA]
    head = f"Reference: {found.reference}, {chosen}. Against it (Holm-adjusted exact McNemar, α = {ALPHA:g}), "
    if not worse:
        return head + f"no row differs significantly on these {found.n_test} test images."
    tied = [c.method for c in others if c not in worse]
    return (
        head
        + f"{len(worse)} of {len(others)} rows score significantly lower"
        + (f"; not resolved from it: {', '.join(tied)}." if tied else ".")
    )


# ------------------------------------------------------------------------------------------ across sets
def across_datasets(verdicts: Sequence[DatasetVerdict]) -> list[str]:
    """With three or more datasets: how many fall under each decision, and a Wilcoxon signed-rank test of Δ
    (fine-tuned − frozen) over the datasets (Demšar 2006)."""
    decided = [v.question for v in verdicts if v.question is not None]
    if len(decided) < 3:
        return []
    from scipy.stats import wilcoxon

    counts = {o: sum(d.outcome == o for d in decided) for o in ("pays", "enough", "better", "inconclusive")}
    words = {"pays": "fine-tuning pays", "enough": "frozen is enough", "better": "frozen is better"}
    parts = [f"{words.get(o, o)} on {k}" for o, k in counts.items() if k]
    deltas = np.array([d.difference for d in decided])
    if np.all(deltas == 0):
        test = "every Δ is 0"
    else:
        res = wilcoxon(deltas)
        test = f"Wilcoxon signed-rank over the {len(deltas)} datasets: median Δ {_pt(float(np.median(deltas)))}, " + (
            f"p = {res.pvalue:.2g}" if res.pvalue >= 0.001 else "p < 0.001"
        )
    return [f"Across {len(decided)} datasets: {', '.join(parts)}; {test}."]
