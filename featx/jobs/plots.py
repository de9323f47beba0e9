"""The report's plots: accuracy by method (the axis from 0), confusion matrices, learning and fine-tuning curves.

Each figure is written as PNG (embedded in the HTML page) and SVG, drawn on figure objects
(no pyplot, no display, the caller's backend untouched) and written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featx._runtime.io import atomic_write

__all__ = ["plot_datasets"]

#: A report row (:class:`featx.jobs.report.Row`): a mapping of its numbers and provenance.
Row = Mapping[str, Any]


class _Figures:
    """Saves each figure as PNG and SVG into one folder and remembers its title and PNG path, in order.

    Figures are :class:`matplotlib.figure.Figure` objects made without pyplot, so no backend is chosen or
    switched (a notebook's stays as it was) and no figure lingers in pyplot's registry.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[tuple[str, Path]] = []
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
        """A new figure and its axes, as ``pyplot.subplots`` returns them."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    def save(self, fig, name: str, title: str) -> None:
        """Write ``fig`` as ``name.png`` and ``name.svg`` (each atomically) and list it under ``title``."""
        fig.tight_layout()
        for suffix in ("png", "svg"):
            atomic_write(self.folder / f"{name}.{suffix}", lambda fh, fmt=suffix: fig.savefig(fh, format=fmt, dpi=110))
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
    fig, ax = figures.subplots(figsize=(8, 0.45 * len(scored) + 1.2))
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
    fig, ax = figures.subplots(figsize=(min(8, 1.5 + 0.45 * n), min(7, 1.2 + 0.4 * n)))
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
    """Frozen-feature accuracy by training images per class, with each fine-tune (on all data) as a line."""
    fig, ax = figures.subplots(figsize=(7, 4))
    for r in group:
        if not r["few_shot"]:
            continue
        pts = [p for p in r["few_shot"] if p["shots"] != "all"]
        ax.errorbar(
            [p["shots"] for p in pts],
            [p["mean"] for p in pts],
            yerr=[p["std"] for p in pts],
            marker="o",
            capsize=3,
            label=f"frozen: {r['method']}",
        )
    for r in group:
        if r["kind"] == "finetune" and r["accuracy"] is not None:
            ax.axhline(r["accuracy"], linestyle="--", color="#c44e52", label=f"fine-tuned (all data): {r['method']}")
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: learning curves")
    ax.legend(fontsize=7)
    figures.save(fig, name, f"{dataset}: learning curves, frozen vs fine-tuned")


def _finetune_plot(figures: _Figures, tuned: list[Row], dataset: str, name: str) -> None:
    """Train and val loss, and val accuracy, by epoch."""
    fig, (loss, accuracy) = figures.subplots(1, 2, figsize=(10, 3.8))
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
