"""The report's plots: accuracy by method (the axis from 0), confusion matrices, learning and fine-tuning curves.

Each figure is written as PNG (embedded in the HTML page) and SVG, with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_datasets"]

#: A report row (:class:`featx.jobs.report.Row`): a mapping of its numbers and provenance.
Row = Mapping[str, Any]


class _Figures:
    """Saves each figure as PNG and SVG into one folder and remembers its title and PNG path, in order."""

    def __init__(self, folder: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.folder = plt, folder
        self.made: list[tuple[str, Path]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, fig, name: str, title: str) -> None:
        """Write ``fig`` as ``name.png`` and ``name.svg``, close it, and list it under ``title``."""
        fig.tight_layout()
        for suffix in ("png", "svg"):
            fig.savefig(self.folder / f"{name}.{suffix}", dpi=110)
        self.plt.close(fig)
        self.made.append((title, self.folder / f"{name}.png"))


def plot_datasets(groups: Mapping[str, list[Row]], folder: Path) -> list[tuple[str, Path]]:
    """Per dataset (its rows, best first): accuracy by method, a confusion matrix per method, learning curves,
    fine-tuning curves; each written as PNG and SVG into ``folder``. Returns (title, PNG path) in order."""
    figures = _Figures(folder)
    for i, (dataset, group) in enumerate(groups.items()):
        scored = [r for r in group if r["accuracy"] is not None]
        if scored:
            _accuracy_plot(figures, scored, dataset, f"accuracy-{i}")
        for j, r in enumerate(scored):
            if r["confusion"]:
                _confusion_plot(figures, r, dataset, f"confusion-{i}-{j}")
        if any(r["few_shot"] for r in group):
            _learning_plot(figures, group, dataset, f"learning-{i}")
        if any(r["curves"] for r in group):
            _finetune_plot(figures, [r for r in group if r["curves"]], dataset, f"finetune-{i}")
    return figures.made


def _accuracy_plot(figures: _Figures, scored: list[Row], dataset: str, name: str) -> None:
    fig, ax = figures.plt.subplots(figsize=(8, 0.45 * len(scored) + 1.2))
    acc = np.array([r["accuracy"] for r in scored])
    lo = np.array([r["ci"][0] if r["ci"] else a for r, a in zip(scored, acc, strict=True)])
    hi = np.array([r["ci"][1] if r["ci"] else a for r, a in zip(scored, acc, strict=True)])
    y = np.arange(len(scored))[::-1]
    colors = ["#c44e52" if r["kind"] == "finetune" else "#4c72b0" for r in scored]
    ax.barh(y, acc, xerr=[acc - lo, hi - acc], color=colors, capsize=3)
    ax.set_yticks(y, [r["method"] for r in scored])
    ax.set_xlabel("test accuracy (95% bootstrap CI; the axis starts at 0)")
    ax.set_xlim(0.0, 1.0)
    ax.set_title(f"{dataset}: accuracy by method")
    figures.save(fig, name, f"{dataset}: accuracy by method")


def _confusion_plot(figures: _Figures, r: Row, dataset: str, name: str) -> None:
    cm = np.array(r["confusion"])
    n = len(cm)
    fig, ax = figures.plt.subplots(figsize=(min(8, 1.5 + 0.45 * n), min(7, 1.2 + 0.4 * n)))
    ax.imshow(cm, cmap="Blues")
    if n <= 20:  # beyond that the labels and counts would not be legible
        ax.set_xticks(range(n), r["class_names"] or range(n), rotation=90)
        ax.set_yticks(range(n), r["class_names"] or range(n))
        for a in range(n):
            for b in range(n):
                color = "white" if cm[a, b] > cm.max() / 2 else "black"
                ax.text(b, a, int(cm[a, b]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(r["method"], fontsize=9)
    figures.save(fig, name, f"{dataset}: confusion matrix, {r['method']}")


def _learning_plot(figures: _Figures, group: list[Row], dataset: str, name: str) -> None:
    """Frozen-feature accuracy by training images per class, its "all" point included, and each fine-tune as a
    point where it was measured: at all the training images. Error bars are the intervals the results hold
    (over the draws at k shots; the test bootstrap at "all"), and the axis reads as plain integers."""
    from matplotlib.ticker import NullLocator

    fig, ax = figures.plt.subplots(figsize=(7, 4))
    curves = [r for r in group if r["few_shot"]]
    shots = sorted({p["shots"] for r in curves for p in r["few_shot"] if p["shots"] != "all"})
    x_all, all_label = _all_position(group, shots)
    for r in curves:
        pts = sorted(r["few_shot"], key=lambda p: x_all if p["shots"] == "all" else p["shots"])
        xs = [x_all if p["shots"] == "all" else p["shots"] for p in pts]
        means = [p["mean"] for p in pts]
        lows, highs = zip(*(_interval(p, r) for p in pts), strict=True)
        ax.errorbar(xs, means, yerr=_yerr(means, lows, highs), marker="o", capsize=3, label=f"frozen: {r['method']}")
    tuned = [r for r in group if r["kind"] == "finetune" and r["accuracy"] is not None]
    for i, r in enumerate(tuned):
        low, high = r["ci"] or (r["accuracy"], r["accuracy"])
        ax.errorbar(
            [x_all * 1.04 ** (i + 1)],  # nudged right, so the frozen "all" point stays visible beside it
            [r["accuracy"]],
            yerr=_yerr([r["accuracy"]], [low], [high]),
            marker="D",
            linestyle="none",
            color="#c44e52",
            capsize=3,
            label=f"fine-tuned (all data): {r['method']}",
        )
    ax.set_xscale("log")
    ax.set_xticks([*shots, x_all], [*map(str, shots), all_label])
    ax.xaxis.set_minor_locator(NullLocator())  # no 2×10^0 between the labelled points
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy (95% interval)")
    ax.set_title(f"{dataset}: learning curves")
    ax.legend(fontsize=7)
    figures.save(fig, name, f"{dataset}: learning curves, frozen vs fine-tuned")


def _images_per_class(r: Row) -> float | None:
    """A row's training images per class on average (its train split over its classes), when recorded."""
    train = ((r.get("split") or {}).get("sizes") or {}).get("train")
    classes = len(r.get("class_names") or [])
    return train / classes if train and classes else None


def _all_position(group: list[Row], shots: list[int]) -> tuple[float, str]:
    """Where "all" sits on the axis and its label: at the training images per class when the rows record them
    (never on or left of the largest k), else past the largest k."""
    largest = max(shots, default=0)
    known = [n for n in map(_images_per_class, group) if n]
    if not known:
        return float(2 * largest or 1), "all"
    n = round(max(known))
    return float(max(n, 1.5 * largest, 1)), f"all ({n})"


def _interval(point: Mapping[str, Any], r: Row) -> tuple[float, float]:
    """A learning-curve point's 95 % interval: the t interval over its draws; at "all" (one fit), the row's
    bootstrap interval on the test images. An older result without one gets no bar."""
    if point["shots"] == "all" and r["ci"]:
        return tuple(r["ci"])
    low, high = point.get("ci95") or (point["mean"], point["mean"])
    return low, high


def _yerr(means: list[float], lows: Any, highs: Any) -> np.ndarray:
    """Asymmetric error-bar lengths below and above each mean (never negative)."""
    means, lows, highs = (np.asarray(v, dtype=float) for v in (means, lows, highs))
    return np.vstack([np.maximum(means - lows, 0.0), np.maximum(highs - means, 0.0)])


def _finetune_plot(figures: _Figures, tuned: list[Row], dataset: str, name: str) -> None:
    """Train and val loss, and val accuracy, by epoch."""
    fig, (loss, accuracy) = figures.plt.subplots(1, 2, figsize=(10, 3.8))
    for r in tuned:
        epochs = [c["epoch"] for c in r["curves"]]
        loss.plot(epochs, [c["train_loss"] for c in r["curves"]], marker="o", label=f"{r['method']} train")
        loss.plot(epochs, [c["val_loss"] for c in r["curves"]], marker="x", linestyle="--", label=f"{r['method']} val")
        accuracy.plot(epochs, [c["val_accuracy"] for c in r["curves"]], marker="o", label=r["method"])
    for ax, ylabel in ((loss, "loss"), (accuracy, "val accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: fine-tuning curves")
    figures.save(fig, name, f"{dataset}: fine-tuning curves")
