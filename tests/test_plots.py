"""The report's plots: written atomically, without touching the caller's matplotlib backend."""

from __future__ import annotations

import matplotlib
import pytest

from featx.jobs.plots import plot_datasets


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
