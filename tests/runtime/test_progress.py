"""Progress: a bar on a terminal, plain log lines (every ~10 % or 30 s) anywhere else."""

from __future__ import annotations

import io

import pytest

from featx._runtime import progress as progress_mod
from featx._runtime.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def lines(caplog):
    caplog.set_level("INFO", logger="featx.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "featx.progress"]


def test_a_pipe_gets_no_bar_but_a_line_every_tenth(lines):
    stream = io.StringIO()
    with Progress(total=50, desc="extract", unit="img", stream=stream) as bar:
        for _ in range(50):
            bar.update(1)
    assert stream.getvalue() == ""  # no \r redraws, no cursor moves
    logged = lines()
    assert len(logged) == 10 and logged[0].startswith("extract: 5/50 img (10 %)") and "50/50 img (100 %)" in logged[-1]


def test_a_slow_job_logs_by_time_too(lines, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 40))  # 40 s between calls
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    bar = Progress(total=1000, desc="finetune", unit="batch", every_fraction=None, stream=io.StringIO())
    bar.update(1)
    bar.set_postfix(val_acc="0.930")
    bar.update(1)
    bar.close()  # nothing new since the last line: no line
    logged = lines()
    assert len(logged) == 2 and "left" in logged[0] and logged[-1].endswith("val_acc 0.930")


def test_a_terminal_gets_the_bar_and_no_lines(lines):
    stream = _Terminal()
    with Progress(total=3, desc="extract", unit="img", stream=stream) as bar:
        bar.update(3)
    assert "extract" in stream.getvalue() and "3/3" in stream.getvalue()
    assert lines() == []


def test_disabled_shows_nothing(lines):
    stream = _Terminal()
    with Progress(total=3, desc="x", stream=stream, disable=True) as bar:
        bar.update(3)
    assert stream.getvalue() == "" and lines() == []
