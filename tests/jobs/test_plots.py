"""The report's plots tell the truth: the learning curve keeps its "all" point, a fine-tune is a point where it
was measured (all data), error bars are the intervals in the results, and the axis reads as plain integers. They
are written atomically, without touching the caller's matplotlib backend."""

from __future__ import annotations

import matplotlib
import pytest

import featx.jobs.plots
from featx.jobs.plots import plot_datasets


def _frozen_row():
    few_shot = [
        {"shots": 1, "draws": 5, "mean": 0.55, "std": 0.05, "accuracies": [], "ci95": [0.48, 0.62]},
        {"shots": 2, "draws": 5, "mean": 0.61, "std": 0.04, "accuracies": [], "ci95": [0.56, 0.66]},
        {"shots": 5, "draws": 5, "mean": 0.75, "std": 0.03, "accuracies": [], "ci95": [0.71, 0.79]},
        {"shots": 20, "draws": 5, "mean": 0.85, "std": 0.02, "accuracies": [], "ci95": [0.83, 0.87]},
        {"shots": "all", "draws": 1, "mean": 0.9387, "std": 0.0, "accuracies": [0.9387], "ci95": [0.9387, 0.9387]},
    ]
    return {
        "method": "logreg · lite0 · penultimate",
        "kind": "classifier",
        "accuracy": 0.9387,
        "ci": [0.90, 0.97],
        "confusion": None,
        "few_shot": few_shot,
        "curves": None,
        "split": {"sizes": {"train": 196, "val": 49, "test": 153}},
        "class_names": ["ants", "bees"],
    }


def _finetuned_row():
    return {
        "method": "finetune · lite0",
        "kind": "finetune",
        "accuracy": 0.9387,
        "ci": [0.91, 0.97],
        "confusion": None,
        "few_shot": None,
        "curves": None,
        "split": {"sizes": {"train": 196, "val": 49, "test": 153}},
        "class_names": ["ants", "bees"],
    }


@pytest.fixture
def learning_axes(tmp_path, monkeypatch):
    figures = []
    save = featx.jobs.plots._Figures.save

    def keep(self, fig, name, title):  # the figures are objects, not pyplot's: keep them to look at them
        figures.append(fig)
        save(self, fig, name, title)

    monkeypatch.setattr(featx.jobs.plots._Figures, "save", keep)
    plot_datasets({"hymenoptera": [_frozen_row(), _finetuned_row()]}, tmp_path)
    axes = [ax for fig in figures for ax in fig.axes if "learning" in ax.get_title()]
    assert len(axes) == 1
    return axes[0]


def test_the_frozen_curve_keeps_its_all_point_and_the_fine_tune_is_a_point_there(learning_axes):
    lines = {c.get_label(): c.lines[0] for c in learning_axes.containers}  # each errorbar's data line
    frozen = lines["frozen: logreg · lite0 · penultimate"]
    tuned = lines["fine-tuned (all data): finetune · lite0"]
    xs = list(frozen.get_xdata())
    assert len(xs) == 5 and list(frozen.get_ydata())[-1] == pytest.approx(0.9387)
    assert xs[-1] == pytest.approx(98)  # all = 196 training images / 2 classes
    assert list(tuned.get_xdata()) == [pytest.approx(xs[-1], rel=0.05)]  # at "all", nudged aside to stay visible
    assert list(tuned.get_ydata()) == [pytest.approx(0.9387)]


def test_error_bars_are_the_intervals_in_the_results(learning_axes):
    segments = [
        sorted(seg[:, 1].tolist())
        for collection in learning_axes.collections
        for seg in collection.get_segments()
        if len(seg) == 2 and seg[0, 0] == seg[1, 0]  # vertical error bars
    ]
    for low_high in ([0.48, 0.62], [0.56, 0.66], [0.71, 0.79], [0.83, 0.87], [0.90, 0.97], [0.91, 0.97]):
        assert any(s == pytest.approx(low_high) for s in segments), low_high


def test_the_axis_is_labelled_with_plain_integers(learning_axes):
    learning_axes.figure.canvas.draw()
    labels = [t.get_text() for t in learning_axes.get_xticklabels() if t.get_text()]
    minor = [t.get_text() for t in learning_axes.get_xticklabels(minor=True) if t.get_text()]
    assert labels == ["1", "2", "5", "20", "all (98)"] and minor == []


def _row(method: str, kind: str = "classifier") -> dict:
    return {
        "method": method,
        "kind": kind,
        "accuracy": 0.75,
        "compute_s": 10.0,
        "ci": (0.5, 0.9),
        "confusion": [[2, 1], [0, 1]],
        "class_names": ["a", "b"],
        "few_shot": [{"shots": 1, "mean": 0.5, "std": 0.1}, {"shots": 2, "mean": 0.6, "std": 0.1}],
        "curves": [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5}] if kind == "finetune" else [],
    }


def test_plots_leave_the_backend_as_they_found_it(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend featx would never pick, so a switch to Agg shows
    try:
        made = plot_datasets({"toy": [_row("logreg"), _row("finetune", "finetune")]}, tmp_path / "plots")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert made["toy"] and made["toy"][0][0] == "toy: accuracy against compute"
    assert all(path.is_file() and path.with_suffix(".svg").is_file() for _, path in made["toy"])


def test_a_plot_that_fails_to_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"half a png")
        else:
            with open(target, "wb") as fh:
                fh.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot_datasets({"toy": [_row("logreg")]}, tmp_path / "plots")
    assert not list((tmp_path / "plots").iterdir())  # a reader never finds half a figure
