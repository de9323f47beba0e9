"""Progress that suits where the output goes: a live bar on a terminal, a few plain log lines elsewhere.

A bar redrawn with ``\\r`` and cursor moves is noise in a file or a CI log (a quickstart log held 140 updates and
48 cursor-up escapes), so when standard error is no terminal, :class:`Progress` draws nothing and logs a line
every tenth of the way (or every ``every_seconds``) and at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["Progress"]

log = logging.getLogger("featx.progress")


def _is_terminal(stream: Any) -> bool:
    """Whether a bar can be drawn on ``stream``: a terminal, or a Jupyter kernel's (tqdm.auto draws a widget)."""
    if stream is sys.stderr and "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """A tqdm bar on a terminal; otherwise plain log lines (``featx.progress``, INFO) at ~10 % steps or 30 s.

    Parameters
    ----------
    total : int, optional
        Units to do (``None``: unknown, then lines come by time only).
    desc : str
        What is progressing (``extract``, ``finetune``).
    unit : str, default="it"
        The unit counted (``img``, ``epoch``, ``batch``).
    initial : int, default=0
        Units already done (a resumed job).
    disable : bool, default=False
        Show nothing at all.
    every_fraction : float or None, default=0.1
        Log a line each time this share of ``total`` more is done (``None``: by time only).
    every_seconds : float, default=30
        Log a line when this long has passed since the last one, whatever the share.
    stream : file, optional
        Where a bar would be drawn; standard error by default. Bars are drawn only when it is a terminal.
    **bar_options
        Passed to :class:`tqdm.tqdm` when a bar is drawn (``leave``, ``dynamic_ncols``, ``smoothing`` …).
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        every_fraction: float | None = 0.1,
        every_seconds: float = 30.0,
        stream: Any = None,
        **bar_options: Any,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._lines = not disable and not _is_terminal(stream if stream is not None else sys.stderr)
        if not disable and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, **bar_options)
        self._start = self._last_time = time.monotonic()
        self._start_n = self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and self._due():
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Show ``values`` after the count (``val_acc=0.93``, ``failed=2``)."""
        self.postfix = {**self.postfix, **values}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=refresh)

    def close(self) -> None:
        """End the bar, or log the last line (when anything was done since the previous one)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines and self.n != self._last_n:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last_time >= self.every_seconds:
            return True
        if self.every_fraction is None or not self.total:
            return False
        step = max(1.0, self.every_fraction * self.total)
        return int(self.n // step) > int(self._last_n // step) or self.n >= self.total > self._last_n

    def _line(self) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        text = f"{self.desc}: {done} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f} %)"
        text += f", {_duration(elapsed)}"
        if rate > 0:
            text += f", {rate:.3g} {self.unit}/s"
            if self.total and self.n < self.total:
                text += f", about {_duration((self.total - self.n) / rate)} left"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        log.info("%s", text)
        self._last_time, self._last_n = now, self.n
