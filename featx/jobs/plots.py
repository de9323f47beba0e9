"""The report's plots, per dataset, in the order a reader needs them: accuracy against compute for every row (the
cost–accuracy frontier, the decision's two rows marked), the test images only one of those two rows gets right,
their confusion matrices, learning curves and fine-tuning curves.

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


def plot_datasets(
    groups: Mapping[str, list[Row]],
    folder: Path,
    pairs: Mapping[str, tuple[str, str] | None] | None = None,
) -> dict[str, list[tuple[str, Path]]]:
    """Per dataset: accuracy against compute, the discordant test images and the confusion matrices of its decision's
    pair (``pairs[dataset]`` = (a, b) methods: fine-tuned and frozen, or transfer and no transfer), learning curves,
    fine-tuning curves; each written as PNG and SVG into ``folder``.

    Returns
    -------
    dict
        Per dataset, (title, PNG path) in order.
    """
    figures = _Figures(folder)
    made: dict[str, list[tuple[str, Path]]] = {}
    for i, (dataset, group) in enumerate(groups.items()):
        start = len(figures.made)
        pair = (pairs or {}).get(dataset)
        scored = [r for r in group if r["accuracy"] is not None]
        if scored:
            _cost_accuracy_plot(figures, scored, dataset, f"cost-accuracy-{i}", pair)
        chosen = [r for name in pair or () for r in scored if r["method"] == name]
        if len(chosen) == 2:
            _discordant_plot(figures, chosen, dataset, f"discordant-{i}")
        for j, r in enumerate(chosen or scored[:1]):
            if r["confusion"]:
                _confusion_plot(figures, r, dataset, f"confusion-{i}-{j}")
        if any(r["few_shot"] for r in group):
            _learning_plot(figures, group, dataset, f"learning-{i}")
        if any(r["curves"] for r in group):
            _finetune_plot(figures, [r for r in group if r["curves"]], dataset, f"finetune-{i}")
        made[dataset] = figures.made[start:]
    return made


def _cost_accuracy_plot(
    figures: _Figures, scored: list[Row], dataset: str, name: str, pair: tuple[str, str] | None
) -> None:
    """Test accuracy (Wilson 95 % interval) against compute on a log axis; the frontier joins the rows no cheaper
    row beats; the decision's two rows are labelled."""
    costed = [r for r in scored if r.get("compute_s")]
    if not costed:
        return
    fig, ax = figures.subplots(figsize=(8.5, 4.2))
    x = np.array([r["compute_s"] for r in costed])
    acc = np.array([r["accuracy"] for r in costed])
    lo = np.array([r["ci"][0] if r["ci"] else a for r, a in zip(costed, acc, strict=True)])
    hi = np.array([r["ci"][1] if r["ci"] else a for r, a in zip(costed, acc, strict=True)])
    frontier, best = [], -np.inf
    for k in np.argsort(x, kind="stable"):
        if acc[k] > best:
            frontier.append(k)
            best = acc[k]
    ax.step(x[frontier], acc[frontier], where="post", color="#999", linewidth=1, label="cost–accuracy frontier")
    for k, r in enumerate(costed):
        color = "#c44e52" if r["kind"] == "finetune" else ("#8c8c8c" if r.get("baseline") else "#4c72b0")
        marked = pair is not None and r["method"] in pair
        ax.errorbar(
            x[k],
            acc[k],
            yerr=[[acc[k] - lo[k]], [hi[k] - acc[k]]],
            fmt="o",
            color=color,
            capsize=3,
            markersize=9 if marked else 5,
            markeredgecolor="black" if marked else color,
        )
        if marked or k in frontier:
            ax.annotate(r["method"], (x[k], acc[k]), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("compute, seconds (extraction + fitting; log scale)")
    ax.set_ylabel("test accuracy (Wilson 95% CI; the axis from 0)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"{dataset}: accuracy against compute (red: fine-tuned, blue: frozen, grey: no transfer)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    figures.save(fig, name, f"{dataset}: accuracy against compute")


def _discordant_plot(figures: _Figures, pair: list[Row], dataset: str, name: str, per_side: int = 12) -> None:
    """The test images only one of the two rows gets right (McNemar's discordant pairs), as thumbnails with the
    true label and each row's prediction."""
    a, b = pair
    paths = _image_paths(b) or _image_paths(a)
    pa, pb = _predicted(a), _predicted(b)
    shared = sorted(set(pa) & set(pb))
    only_a = [i for i in shared if pa[i][0] == pa[i][1] and pb[i][0] != pb[i][1]]
    only_b = [i for i in shared if pb[i][0] == pb[i][1] and pa[i][0] != pa[i][1]]
    if not paths or not (only_a or only_b):
        return
    names = a["class_names"] or b["class_names"]
    label = (lambda k: names[k] if 0 <= k < len(names) else str(k)) if names else str
    cols = max(1, min(per_side, max(len(only_a), len(only_b))))
    fig, axes = figures.subplots(2, cols, figsize=(1.15 * cols + 0.6, 3.8), squeeze=False)
    for row, (ids, who) in enumerate(((only_a, a["method"]), (only_b, b["method"]))):
        shown = f", {cols} shown" if len(ids) > cols else ""
        axes[row][0].text(
            0, 1.42, f"only {who} right: {len(ids)} images{shown}", transform=axes[row][0].transAxes, fontsize=8
        )
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(ids):
                if col:  # the first keeps its frame for the side's label
                    ax.axis("off")
                continue
            image = _thumbnail(paths.get(ids[col]))
            if image is not None:
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            true, pred_a = pa[ids[col]]
            pred_b = pb[ids[col]][1]
            ax.set_title(f"{label(true)}\n{label(pred_a)} / {label(pred_b)}", fontsize=6)
    fig.suptitle(
        f"{dataset}: test images only one row gets right (title: true label, then {a['method'][:30]} / "
        f"{b['method'][:30]} predictions)",
        fontsize=8,
    )
    figures.save(fig, name, f"{dataset}: the test images where the two rows differ")


def _predicted(row: Row) -> dict[str, tuple[int, int]]:
    p = row.get("predictions") or {}
    return {i: (t, y) for i, t, y in zip(p.get("ids", []), p.get("true", []), p.get("predicted", []), strict=True)}


def _image_paths(row: Row) -> dict[str, str]:
    """Image id → file, from the row's feature store (a frozen row); empty when it cannot be read."""
    store = row.get("store_path")
    if not store or not Path(store).is_file():
        return {}
    try:
        import h5py

        with h5py.File(store, "r") as fh:
            return {i.decode(): p.decode() for i, p in zip(fh["ids"][:], fh["paths"][:], strict=True)}
    except (OSError, KeyError, ValueError):
        return {}


def _thumbnail(path: str | None, size: int = 96) -> np.ndarray | None:
    if not path:
        return None
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEGs decode at a fraction of their size
            img = img.convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except (OSError, ValueError):
        return None


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
    """Frozen-feature accuracy by training images per class, its "all" point included, and each fine-tune as a
    point where it was measured: at all the training images. Error bars are the intervals the results hold
    (over the draws at k shots; the test bootstrap at "all"), and the axis reads as plain integers."""
    from matplotlib.ticker import NullLocator

    fig, ax = figures.subplots(figsize=(7, 4))
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
