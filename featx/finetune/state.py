"""A fine-tuning run's state between epochs, and its ``checkpoint.pt`` form.

The state records where the run stands (the next phase and epoch to train), the best epoch so far and the
curves; the checkpoint adds the weights and the optimiser, scheduler and gradient scaler states taken at
that point. The checkpoint is a plain dict of tensors and Python values (read with
``torch.load(weights_only=True)``); its keys are the ones featx has always written, so a run killed under
an older featx resumes under this one, plus ``lr_sweep`` (:class:`LrSweep`) in a run whose learning rate is
chosen on val, and ``seconds`` (the compute every process of the run spent up to that checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from featx._runtime.io import atomic_write
from featx.exceptions import DamagedFileError

__all__ = ["CHECKPOINT_KEYS", "LrSweep", "RunState", "read_checkpoint", "save_checkpoint"]


#: The keys of a ``checkpoint.pt``: the on-disk format, unchanged since resuming was introduced.
CHECKPOINT_KEYS = (
    "run_hash",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "curves",
    "best",
    "phase",
    "epoch_in_phase",
    "stale",
)


@dataclass
class LrSweep:
    """The choice of the base learning rate on val, as far as it has gone (see :mod:`featx.finetune.sweep`).

    Attributes
    ----------
    phase : int
        Index of the phase whose first epoch each candidate trains.
    order : list of float
        The candidate base rates, in the order they are tried.
    selected_by : str
        ``val_loss`` or ``val_accuracy`` (ties: the lower val loss).
    runs : list of dict
        One per candidate tried: its ``lr``, ``val_loss``, ``val_accuracy``, ``train_loss``, ``seconds`` and
        ``curve`` (its epoch records).
    cut : list of float
        Candidates not tried, as they would have ended past ``max_minutes``.
    chosen : float, optional
        The chosen base rate, once every candidate is tried or cut.
    start : dict, optional
        The weights every candidate starts from; dropped once the rate is chosen.
    best : dict, optional
        The best candidate so far: its ``lr`` and its ``model``, ``optimizer``, ``scheduler`` and ``scaler``
        state dicts, which the run goes on from; dropped once the rate is chosen.
    """

    phase: int
    order: list[float]
    selected_by: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    cut: list[float] = field(default_factory=list)
    chosen: float | None = None
    start: dict[str, torch.Tensor] | None = None
    best: dict[str, Any] | None = None

    @property
    def pending(self) -> list[float]:
        """The candidates neither tried nor cut, in order."""
        done = {r["lr"] for r in self.runs} | set(self.cut)
        return [lr for lr in self.order if lr not in done]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``checkpoint.pt`` (tensors and Python values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would copy the tensors

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LrSweep:
        """Inverse of :meth:`to_dict`."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class RunState:
    """Where a fine-tuning run stands after an epoch, and what it needs to go on from there.

    Attributes
    ----------
    run_hash : str
        Hash of the data, backbone and configuration; a checkpoint of another run is never resumed.
    phase : int
        Index of the phase to train next (``len(config.phases)`` once every phase is done).
    epoch_in_phase : int
        The next epoch within that phase (0 at a phase's start).
    stale : int
        Epochs in a row without improving the monitored metric, within the current phase.
    best_metric : float, optional
        The best value of the monitored metric so far (higher is better: ``-val_loss`` for ``val_loss``).
    best_epoch : int, optional
        The (1-based, global) epoch that reached it, 0 for the weights before any update; its weights are
        ``model.safetensors``.
    curves : list of dict
        One record per finished epoch (losses, accuracies, learning rates, throughput), after epoch 0's.
    model, optimizer, scheduler, scaler : dict, optional
        State dicts taken when the checkpoint was written; ``None`` for a run that starts afresh, and
        dropped (:meth:`release`) once they have been loaded into the live objects.
    lr_sweep : LrSweep, optional
        The choice of the learning rate on val, in a run that makes one, once it has begun.
    seconds : float
        Wall-clock seconds the run's earlier processes spent up to the checkpoint this state was read from (0 for
        a fresh run, and for a checkpoint of a featx that did not record it); :meth:`elapsed` adds this one's.
    clock : float, optional
        ``time.perf_counter()`` when this process began working on the run (:meth:`start_clock`); not saved.
    """

    run_hash: str
    phase: int = 0
    epoch_in_phase: int = 0
    stale: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    lr_sweep: LrSweep | None = None
    seconds: float = 0.0
    clock: float | None = None

    def start_clock(self, at: float | None = None) -> None:
        """Count this process's time from ``at`` (a ``time.perf_counter()`` value; now by default)."""
        self.clock = time.perf_counter() if at is None else at

    def elapsed(self) -> float:
        """The run's compute so far: the earlier processes' seconds and this one's since :meth:`start_clock`.

        A resumed run thus records what an uninterrupted one would: the time of every epoch it keeps, plus each
        process's start-up; the work of an epoch cut short by the interruption is not counted (it is redone).
        """
        return self.seconds + (time.perf_counter() - self.clock if self.clock is not None else 0.0)

    @property
    def lr_base(self) -> float | None:
        """The base learning rate chosen on val (``None`` before the choice, or in a run without one)."""
        return self.lr_sweep.chosen if self.lr_sweep is not None else None

    @property
    def resumes_mid_phase(self) -> bool:
        """Whether the optimiser, scheduler and scaler states must be restored (a phase was cut short)."""
        return self.epoch_in_phase > 0 and self.optimizer is not None

    def record(self, metric: float, epoch: int) -> bool:
        """Count one finished epoch's monitored ``metric``; returns whether it is the new best."""
        if self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_epoch, self.stale = metric, epoch, 0
            return True
        self.stale += 1
        return False

    def advance(self, phase: int, epoch: int, *, phase_done: bool) -> None:
        """Move past ``epoch`` of ``phase``: to the phase's next epoch, or to the next phase's start."""
        if phase_done:
            self.phase, self.epoch_in_phase, self.stale = phase + 1, 0, 0
        else:
            self.phase, self.epoch_in_phase = phase, epoch + 1

    def release(self) -> None:
        """Drop the loaded state dicts (they live on in the model and optimiser now)."""
        self.model = self.optimizer = self.scheduler = self.scaler = None

    def without_weights(self) -> RunState:
        """A copy without state dicts: the record of a finished run (its weights are ``model.safetensors``).

        Resuming from it trains nothing (every phase is done) and still refuses a run with other settings.
        """
        sweep = None if self.lr_sweep is None else dataclasses.replace(self.lr_sweep, start=None, best=None)
        return dataclasses.replace(self, model=None, optimizer=None, scheduler=None, scaler=None, lr_sweep=sweep)

    def to_checkpoint(self) -> dict[str, Any]:
        """The dict ``checkpoint.pt`` holds (keys :data:`CHECKPOINT_KEYS`, ``seconds``, and ``lr_sweep`` once there
        is one)."""
        sweep = {} if self.lr_sweep is None else {"lr_sweep": self.lr_sweep.to_dict()}
        return sweep | {
            "seconds": self.elapsed(),
            "run_hash": self.run_hash,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "curves": self.curves,
            "best": {"metric": self.best_metric, "epoch": self.best_epoch},
            "phase": self.phase,
            "epoch_in_phase": self.epoch_in_phase,
            "stale": self.stale,
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_checkpoint`; reads every checkpoint featx has written.

        Raises
        ------
        ValueError
            ``data`` lacks one of :data:`CHECKPOINT_KEYS` (it is not a featx fine-tuning checkpoint).
        """
        missing = [k for k in CHECKPOINT_KEYS if k not in data]
        if missing:
            raise ValueError(f"not a featx fine-tuning checkpoint: it lacks {', '.join(missing)}")
        best = data["best"]
        return cls(
            run_hash=data["run_hash"],
            phase=int(data["phase"]),
            epoch_in_phase=int(data["epoch_in_phase"]),
            stale=int(data["stale"]),
            best_metric=best["metric"],
            best_epoch=best["epoch"],
            curves=list(data["curves"]),
            model=data["model"],
            optimizer=data["optimizer"],
            scheduler=data["scheduler"],
            scaler=data["scaler"],
            lr_sweep=LrSweep.from_dict(data["lr_sweep"]) if data.get("lr_sweep") is not None else None,
            seconds=float(data.get("seconds", 0.0)),
        )

    def with_live(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
    ) -> RunState:
        """A copy holding the live objects' state dicts, ready to be written."""
        return dataclasses.replace(
            self,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
        )


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint saved at ``path`` as written (see :meth:`RunState.from_checkpoint`), or ``None``.

    Raises
    ------
    DamagedFileError
        ``path`` cannot be read as a featx checkpoint: truncated, not a torch file, a pickle that asks for more
        than tensors and plain values (never run: ``weights_only``), or a dict without the checkpoint's keys.
    """
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        reason = " ".join(str(exc).split())
        raise DamagedFileError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {reason[:300]})") from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} is not a featx fine-tuning checkpoint: it holds a {type(data).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in data]
    if missing:
        raise DamagedFileError(f"{path} is not a featx fine-tuning checkpoint: it lacks {', '.join(missing)}")
    return data


def save_checkpoint(path: Path, state: RunState) -> None:
    """Write ``state`` atomically: a reader (or a resumed run) sees the old checkpoint or the new one."""
    checkpoint = state.to_checkpoint()
    atomic_write(path, lambda fh: torch.save(checkpoint, fh))
