"""The decision: is the frozen row enough, or does fine-tuning pay? A margin of practical equivalence, an interval
of the paired difference that counts the variance that matters, and what would decide an inconclusive case.

``Δ = accuracy(tuned) - accuracy(frozen)`` (or transfer − no transfer) is estimated on the test images of each
split; its 95 % interval is read against 0 and the margin ``m`` (default 1 pt), as non-inferiority and
superiority trials read theirs (ICH E9; Piaggio et al. 2012, each one-sided claim at 2.5 %):

- **fine-tuning pays**: the interval lies above 0 (and, if it lies above ``m`` too, by more than the margin);
- **frozen is enough**: the interval lies below ``m``: any gain is smaller than the margin (Schuirmann 1987's
  one-sided test);
- **frozen is better**: the interval lies below 0;
- **inconclusive**: it spans 0 and ``m``; the sentence then says about how many test images or repeats would
  decide it.

The interval depends on what was run:

- **one split, one training seed per row**: Tango's (1998) score interval of a paired difference of proportions,
  which keeps its level at small counts where the Wald and bootstrap intervals undercover;
- **one split, several seeds**: the seeds' predictions are averaged image by image (never reduced to one seed);
  the variance is the test sample's (per-image differences) plus each side's seed-to-seed variance of accuracy
  over its number of seeds;
- **several splits** (``repeats``): the per-split differences (seeds averaged) through Nadeau & Bengio's (2003)
  corrected resampled t-test, whose variance ``(1/R + n_test/n_train) σ²`` accounts for training sets that
  overlap across splits; the same Student posterior is Benavoli et al.'s (2017) Bayesian correlated t-test, which
  gives P(Δ > m), P(|Δ| ≤ m) and P(Δ < −m) with the region of practical equivalence ``[−m, m]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_MARGIN",
    "LEVEL",
    "OUTCOMES",
    "Decision",
    "decide",
    "outcome_of",
    "paired_score_interval",
    "resolvable_difference",
]

#: The margin of practical equivalence: a gain under 1 pt of accuracy is not worth a change of method unless the
#: user says otherwise (``margin`` in a pipeline, ``featx compare --margin``).
DEFAULT_MARGIN = 0.01

#: The level of every interval the decision reads (each one-sided claim at (1 - LEVEL) / 2).
LEVEL = 0.95

#: The four answers, in the words the sentences use.
OUTCOMES = ("pays", "enough", "better", "inconclusive")


# -------------------------------------------------------------------------------------------- intervals
def _tango_z(b: int, c: int, n: int, delta0: float) -> float:
    """Tango's score statistic for ``H0: Δ = delta0``, ``b`` images only the first row gets right, ``c`` only the
    second: ``(b - c - n·δ0) / sqrt(n (2 q + δ0 (1 - δ0)))``, ``q`` the restricted MLE of P(only the second)."""
    a2 = 2.0 * n
    bb = -b - c + (2.0 * n - b + c) * delta0
    cc = -c * delta0 * (1.0 - delta0)
    q = (math.sqrt(max(bb * bb - 4.0 * a2 * cc, 0.0)) - bb) / (2.0 * a2)
    var = n * (2.0 * q + delta0 * (1.0 - delta0))
    diff = b - c - n * delta0
    if var <= 0.0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(var)


def paired_score_interval(b: int, c: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Tango's (1998) score interval of ``Δ = (b - c) / n``, the accuracy difference of two rows on the same
    ``n`` images (``b`` images only the first gets right, ``c`` only the second).

    Inverts the score test: the interval holds every ``δ0`` whose statistic is within the two-sided normal
    quantile. Its coverage stays near ``level`` down to a handful of discordant images, and it is not degenerate
    when no image is discordant.
    """
    from scipy.optimize import brentq
    from scipy.stats import norm

    if n <= 0:
        return (float("nan"), float("nan"))
    z = float(norm.ppf(0.5 + level / 2.0))
    est = (b - c) / n
    eps = 1e-12
    # Z(δ0) falls from +inf at δ0 = -1 to -inf at δ0 = 1, through 0 at the estimate.
    lo = -1.0 if est <= -1.0 + eps else brentq(lambda d: _tango_z(b, c, n, d) - z, -1.0 + eps, est, xtol=1e-10)
    hi = 1.0 if est >= 1.0 - eps else brentq(lambda d: _tango_z(b, c, n, d) + z, est, 1.0 - eps, xtol=1e-10)
    return float(lo), float(hi)


def resolvable_difference(discordant: int, n: int, alpha: float) -> float | None:
    """The smallest accuracy difference the exact (binomial) McNemar test calls significant at ``alpha``, given
    ``discordant`` images on which the two rows disagree out of ``n``: ``|b - c| / n`` for the least lopsided
    split ``b : c`` of the discordant images with ``p < alpha``; ``None`` when even all of them to one row is not
    enough (11 discordant images of 153 need 10 : 1, 5.9 pt; 6 : 0 is enough with 6, 3.9 pt, p = 0.031)."""
    from scipy.stats import binom

    if n <= 0 or discordant <= 0:
        return None
    b = np.arange(math.ceil(discordant / 2), discordant + 1)
    p = np.minimum(1.0, 2.0 * binom.sf(b - 1, discordant, 0.5))  # two-sided: twice the upper tail at b
    hits = np.flatnonzero(p < alpha)
    return None if hits.size == 0 else float(2 * b[hits[0]] - discordant) / n


def outcome_of(low: float, high: float, margin: float) -> str:
    """Which of :data:`OUTCOMES` an interval of ``Δ = tuned - frozen`` gives against ``margin``."""
    if high < 0:
        return "better"
    if high < margin:
        return "enough"
    if low > 0:
        return "pays"
    return "inconclusive"


# --------------------------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class Decision:
    """The answer for one pair of rows (``a`` = the fine-tuned / transfer row, ``b`` = the frozen / baseline row).

    ``outcome`` is one of :data:`OUTCOMES`, read from ``interval`` against ``margin`` (see the module docstring).
    """

    outcome: str
    difference: float  # Δ = accuracy(a) - accuracy(b), seeds averaged, splits averaged
    interval: tuple[float, float]
    margin: float
    level: float
    method: str  # how the interval was made, in words
    n_test: int  # test images of one split (the first)
    splits: int
    seeds: tuple[int, int]  # training seeds of a and of b (per split)
    above_margin: bool  # "pays" by more than the margin (the interval lies above it)
    probabilities: dict[str, float] | None = None  # P(a better by > m), P(within ±m), P(b better by > m)
    to_decide: str | None = None  # what would decide an inconclusive case
    not_counted: list[str] = field(default_factory=list)  # variance the interval could not account for
    cost_ratio: float | None = None  # compute(a) / compute(b), each averaged over its runs
    fixed_test_repeats: int = 1  # split seeds that re-carved only train and val around one test split

    def to_dict(self) -> dict:
        """JSON-ready (report.json)."""
        return {**vars(self), "interval": list(self.interval), "seeds": list(self.seeds)}


def decide(
    a: Mapping[str, Sequence[np.ndarray]],
    b: Mapping[str, Sequence[np.ndarray]],
    *,
    margin: float = DEFAULT_MARGIN,
    level: float = LEVEL,
    train_sizes: Mapping[str, int] | None = None,
    fixed_test_repeats: int = 1,
) -> Decision:
    """Decide ``a`` against ``b`` over the splits both were run on.

    Parameters
    ----------
    a, b : mapping of split key to a sequence of bool arrays
        Per split, one array per training seed: whether each test image was right, aligned image by image
        (the same images, in the same order, for ``a`` and ``b`` within a split).
    margin : float, default=DEFAULT_MARGIN
        The margin of practical equivalence, as a fraction of accuracy (0.01 = 1 pt).
    level : float, default=LEVEL
    train_sizes : mapping of split key to int, optional
        Images a model learned from in each split (train + val): Nadeau & Bengio's correction needs
        ``n_test / n_train``. Without it the correction assumes a 20 % test split.
    fixed_test_repeats : int, default=1
        How many split seeds the runs of one split hold when the source fixes the test images (a folder's own
        val split as test): the seeds re-carved only train and val, so their runs vary like training seeds and the
        test split's own variance cannot be counted.

    Returns
    -------
    Decision
    """
    if not 0 < margin < 1:
        raise ValueError(f"margin must be a fraction of accuracy between 0 and 1 (0.01 = 1 pt); got {margin!r}")
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError("the two rows share no split: they cannot be compared paired")
    per_split = [_split_difference(a[k], b[k]) for k in keys]
    n_test = per_split[0].n
    seeds = (min(len(a[k]) for k in keys), min(len(b[k]) for k in keys))
    not_counted = []
    if max(seeds) == 1:
        not_counted.append("training-seed variance (one seed per row: set seeds = [0, 1, 2] on the rows)")
    if len(keys) == 1:
        if fixed_test_repeats > 1:
            not_counted.append(
                f"the test split's own variance (the source fixes the test images: the {fixed_test_repeats} split "
                "seeds re-carved train and val only; a larger test split is what would add to it)"
            )
        else:
            not_counted.append("split-to-split variance (one split: set repeats = 3 or more on the dataset)")
        s = per_split[0]
        if max(seeds) == 1:
            lo, hi = paired_score_interval(s.only_a, s.only_b, s.n, level)
            method = f"Tango's score interval, paired on {s.n} test images"
        else:
            lo, hi = _normal_interval(s.difference, s.variance, level)
            method = f"per-image differences of the run-averaged rows + run-to-run variance, {s.n} test images"
        probabilities = _normal_probabilities(s.difference, s.variance, margin)
        decision = _decision(
            s.difference, (lo, hi), margin, level, method, n_test, 1, seeds, probabilities, not_counted, s
        )
        if fixed_test_repeats > 1 and decision.to_decide:
            decision = dataclasses.replace(decision, to_decide=decision.to_decide.split(", e.g.")[0])
        return dataclasses.replace(decision, fixed_test_repeats=fixed_test_repeats)
    return _over_splits(keys, per_split, margin, level, train_sizes, n_test, seeds, not_counted)


@dataclass(frozen=True)
class _Split:
    n: int
    difference: float
    variance: float  # of the difference's estimate within this split (test sample + seeds)
    per_image_variance: float  # of one image's difference (to project the test images needed)
    only_a: int  # binary, one seed each: images only a / only b gets right (else rounded from the averages)
    only_b: int


def _split_difference(a_runs: Sequence[np.ndarray], b_runs: Sequence[np.ndarray]) -> _Split:
    a_runs = [np.asarray(r, dtype=np.float64) for r in a_runs]
    b_runs = [np.asarray(r, dtype=np.float64) for r in b_runs]
    n = a_runs[0].size
    if any(r.size != n for r in (*a_runs, *b_runs)) or n == 0:
        raise ValueError("paired runs must cover the same, non-empty set of test images")
    d = np.mean(a_runs, axis=0) - np.mean(b_runs, axis=0)
    per_image = float(np.var(d, ddof=1)) if n > 1 else 0.0
    variance = per_image / n
    for runs in (a_runs, b_runs):
        if len(runs) > 1:  # on fixed test images, accuracy varies across seeds by training alone
            variance += float(np.var([r.mean() for r in runs], ddof=1)) / len(runs)
    only_a = round(float(np.clip(d, 0, None).sum()))
    only_b = round(float(np.clip(-d, 0, None).sum()))
    return _Split(n, float(d.mean()), variance, per_image, only_a, only_b)


def _normal_probabilities(estimate: float, variance: float, margin: float) -> dict[str, float]:
    """P(Δ > m), P(|Δ| ≤ m), P(Δ < -m) under the normal approximation of Δ's posterior (flat prior): rough at
    small discordant counts, where the decision itself reads Tango's interval."""
    from scipy.stats import norm

    sd = math.sqrt(max(variance, 0.0))
    if sd == 0:
        above, below = float(estimate > margin), float(estimate < -margin)
    else:
        above, below = float(norm.sf((margin - estimate) / sd)), float(norm.cdf((-margin - estimate) / sd))
    return {"a_better": above, "equivalent": max(0.0, 1.0 - above - below), "b_better": below}


def _normal_interval(estimate: float, variance: float, level: float) -> tuple[float, float]:
    from scipy.stats import norm

    half = float(norm.ppf(0.5 + level / 2.0)) * math.sqrt(max(variance, 0.0))
    return estimate - half, estimate + half


def _over_splits(keys, per_split, margin, level, train_sizes, n_test, seeds, not_counted) -> Decision:
    """Nadeau & Bengio's corrected resampled t over the splits; the same Student posterior (Benavoli et al. 2017's
    correlated t-test) gives the probabilities of the three regions."""
    from scipy.stats import t as student

    r = len(per_split)
    diffs = np.array([s.difference for s in per_split])
    # The spread across splits can come out tiny by chance with 2 or 3 splits; it can never be smaller than the
    # test-sample (and seed) variance each split's difference carries, so that is its floor.
    sigma2 = max(float(np.var(diffs, ddof=1)), float(np.mean([s.variance for s in per_split])))
    ratio = 0.25
    if train_sizes:
        ratio = float(np.mean([s.n / train_sizes[k] for k, s in zip(keys, per_split, strict=True)]))
    scale = math.sqrt((1.0 / r + ratio) * sigma2)
    mean = float(diffs.mean())
    q = float(student.ppf(0.5 + level / 2.0, r - 1))
    interval = (mean - q * scale, mean + q * scale)
    if scale > 0:
        above = float(student.sf((margin - mean) / scale, r - 1))
        below = float(student.cdf((-margin - mean) / scale, r - 1))
    else:
        above, below = float(mean > margin), float(mean < -margin)
    probabilities = {"a_better": above, "equivalent": max(0.0, 1.0 - above - below), "b_better": below}
    method = (
        f"Nadeau & Bengio's corrected t over {r} splits (n_test/n_train = {ratio:.2f}); "
        "probabilities from the Bayesian correlated t-test, ROPE ±margin"
    )
    decision = _decision(mean, interval, margin, level, method, n_test, r, seeds, probabilities, not_counted, None)
    if decision.outcome != "inconclusive":
        return decision
    return dataclasses.replace(decision, to_decide=_repeats_needed(mean, sigma2, ratio, margin, level, r))


def _decision(diff, interval, margin, level, method, n_test, splits, seeds, probabilities, not_counted, one):
    outcome = outcome_of(interval[0], interval[1], margin)
    to_decide = None
    if outcome == "inconclusive" and one is not None:
        to_decide = _images_needed(one, margin, level, seeds)
    return Decision(
        outcome=outcome,
        difference=diff,
        interval=(float(interval[0]), float(interval[1])),
        margin=margin,
        level=level,
        method=method,
        n_test=n_test,
        splits=splits,
        seeds=seeds,
        above_margin=outcome == "pays" and interval[0] > margin,
        probabilities=probabilities,
        to_decide=to_decide,
        not_counted=list(not_counted),
    )


def _distance(diff: float, margin: float) -> float:
    """How far the estimate is from the nearer bound it must clear: 0 (to say "pays") or the margin ("enough")."""
    return max(diff, margin - diff)


def _images_needed(one: _Split, margin: float, level: float, seeds: tuple[int, int]) -> str:
    """About how many test images an interval of the same centre and per-image spread needs to decide."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2.0))
    gap = _distance(one.difference, margin)
    needed = math.ceil(z * z * max(one.per_image_variance, 1e-12) / (gap * gap))
    repeats = math.ceil(needed / one.n)
    seeds_words = " and more training seeds" if max(seeds) > 1 else ""
    return (
        f"about {needed:,} test images (now {one.n:,}) would decide it if the difference and the rows' disagreement "
        f"hold, e.g. repeats = {repeats} splits of this size{seeds_words}"
    )


def _repeats_needed(mean: float, sigma2: float, ratio: float, margin: float, level: float, r: int) -> str:
    """About how many splits the corrected t-test needs to decide, if the mean and spread hold."""
    from scipy.stats import norm
    from scipy.stats import t as student

    gap = _distance(mean, margin)
    if float(norm.ppf(0.5 + level / 2.0)) * math.sqrt(ratio * sigma2) >= gap:
        return (
            "no number of repeats at this split size decides it (the overlap of training sets bounds what "
            "repeats add): a larger test split would"
        )
    for more in range(r + 1, 1001):
        if float(student.ppf(0.5 + level / 2.0, more - 1)) * math.sqrt((1.0 / more + ratio) * sigma2) < gap:
            return f"about repeats = {more} splits (now {r}) would decide it if the mean and spread hold"
    return "more than 1,000 repeats would be needed: the difference is too close to the bounds to decide"
