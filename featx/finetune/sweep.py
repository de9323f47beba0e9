"""Choosing the base learning rate on val, as the classifiers choose C: each candidate rate trains a short run
from the same weights, the best on val goes on.

Internal to :mod:`featx.finetune`: a step of :func:`featx.finetune.trainer.finetune`, taken at the start of
the first phase whose rate is ``auto``. Each candidate trains that phase's first epoch, with the phase's
schedule (warm-up, then cosine: the phase's own, or its stretch of the run's) and the batches and augmentation
of that epoch's seed, so the candidates differ only by their rate. The best candidate's epoch *is* the run's
epoch at that rate: the run goes on from it, so the choice costs one epoch per other candidate. One epoch is the budget
because it is the shortest run that sees every training image once; fewer steps on a small dataset
(hymenoptera: 7 steps an epoch at batch 32) leave the rates undistinguishable. Short runs favour larger
rates (the schedule has not decayed yet), and the later phases inherit the choice: with 3e-2 among the
candidates, the default recipe chose it on three datasets and then lost 13-32 pt of val on two
(benchmarks/RESULTS.md), so the default candidates stop at 1e-2.

The choice is checkpointed after each candidate: a run killed mid-choice resumes with the candidates it
tried, and reaches the weights an uninterrupted run does.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

from featx._runtime import dist as _ddp
from featx.finetune.artifacts import CHECKPOINT
from featx.finetune.config import FinetuneConfig
from featx.finetune.epochs import (
    LivePhase,
    epoch_record,
    epochs_before,
    finish_epoch,
    finite_or_none,
    setup_phase,
    train_epoch,
    validate,
)
from featx.finetune.prepare import Run
from featx.finetune.state import LrSweep, RunState, save_checkpoint
from featx.results import LrSweepSummary

__all__ = ["SMALL_VAL", "at_edge", "choose_rate", "needs_choice", "sweep_order", "sweep_summary"]


#: Below this many val images the candidates are ranked by val loss: one image is then over half a point of
#: accuracy, so accuracies tie or differ by chance where the loss still separates the rates.
SMALL_VAL = 200


def needs_choice(config: FinetuneConfig, state: RunState, phase_index: int) -> bool:
    """Whether the rate must be chosen before ``phase_index`` trains (its rate is ``auto`` and none is chosen)."""
    return config.phases[phase_index].auto and state.lr_base is None


def sweep_order(candidates: tuple[float, ...]) -> list[float]:
    """The ascending ``candidates`` in the order they are tried: the middle one, then outwards (the lower one
    first), so a time cap keeps the central rates."""
    middle = (len(candidates) - 1) // 2
    order = [candidates[middle]]
    for step in range(1, len(candidates)):
        for i in (middle - step, middle + step):
            if 0 <= i < len(candidates):
                order.append(candidates[i])
    return order


def choose_rate(run: Run, state: RunState, phase_index: int, bar: Any) -> LivePhase:
    """Try each candidate base rate on the first epoch of phase ``phase_index``, choose the best on val and
    go on from it: the chosen epoch is recorded as the run's, and its live objects are returned."""
    config = run.config
    sweep = state.lr_sweep
    if sweep is None:
        by = "val_loss" if len(run.rows.val) < SMALL_VAL else "val_accuracy"
        sweep = LrSweep(phase_index, sweep_order(config.candidates), by, start=_copy_weights(run))
        state.lr_sweep = sweep
    scaler_start = run.scaler.state_dict()
    run.info("choosing the learning rate on val (by %s) among %s", sweep.selected_by, sweep.order)
    for lr in sweep.pending:
        if _over_budget(run, sweep):
            sweep.cut.append(lr)
            run.info("lr %g not tried: it would end past --max-minutes %g", lr, config.max_minutes)
            continue
        run.model.net.load_state_dict(sweep.start)
        run.scaler.load_state_dict(scaler_start)
        _try_candidate(run, state, sweep, phase_index, lr)
    return _go_on_from_best(run, state, sweep, phase_index, bar)


def _try_candidate(run: Run, state: RunState, sweep: LrSweep, phase_index: int, lr: float) -> None:
    """Train the phase's first epoch at base rate ``lr``, record it, keep it if best, write the checkpoint."""
    phase = run.config.phases[phase_index]
    t0 = time.perf_counter()
    live = setup_phase(run, phase_index, phase.rate(lr))
    global_epoch = epochs_before(run.config, phase_index)
    stats = train_epoch(run, live.step_model, live.optimizer, live.scheduler, global_epoch)
    val_loss, val_acc = validate(run)
    record = epoch_record(global_epoch, phase_index, phase, stats, val_loss, val_acc)
    result = {
        "lr": lr,
        "val_loss": finite_or_none(val_loss),
        "val_accuracy": val_acc,
        "train_loss": record["train_loss"],
        "seconds": round(time.perf_counter() - t0, 3),
        "curve": [record],
    }
    best = next((r for r in sweep.runs if r["lr"] == sweep.best["lr"]), None) if sweep.best else None
    if best is None or _key(result, sweep.selected_by) > _key(best, sweep.selected_by):
        sweep.best = {
            "lr": lr,
            "model": _copy_weights(run),
            "optimizer": copy.deepcopy(live.optimizer.state_dict()),
            "scheduler": live.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
        }
    sweep.runs.append(result)
    run.info("lr %g: val loss %.4f, val accuracy %.4f", lr, val_loss, val_acc)
    if run.world.is_main:
        save_checkpoint(run.out / CHECKPOINT, state)  # weights live in the sweep until the choice is made
    _ddp.barrier(run.world)


def _go_on_from_best(run: Run, state: RunState, sweep: LrSweep, phase_index: int, bar: Any) -> LivePhase:
    """Make the best candidate the run's: its weights and optimiser, its epoch in the curves."""
    assert sweep.best is not None  # the first candidate is always tried
    best = sweep.best
    chosen = next(r for r in sweep.runs if r["lr"] == best["lr"])
    run.model.net.load_state_dict(best["model"])
    live = setup_phase(run, phase_index, run.config.phases[phase_index].rate(best["lr"]))
    live.restore(run, best)
    sweep.chosen, sweep.start, sweep.best = best["lr"], None, None
    run.info("chose lr %g (by %s)", sweep.chosen, sweep.selected_by)
    record = chosen["curve"][-1]
    val = (math.nan if chosen["val_loss"] is None else chosen["val_loss"], chosen["val_accuracy"])
    finish_epoch(run, state, phase_index, 0, record, val, live, bar)
    return live


def _key(result: dict[str, Any], by: str) -> tuple[float, float]:
    """Higher is better: (val accuracy, -val loss) or (-val loss, val accuracy); diverged runs are the worst."""
    loss = -result["val_loss"] if result["val_loss"] is not None else -math.inf
    accuracy = result["val_accuracy"] if math.isfinite(result["val_accuracy"]) else -math.inf
    return (accuracy, loss) if by == "val_accuracy" else (loss, accuracy)


def _over_budget(run: Run, sweep: LrSweep) -> bool:
    """Whether the next candidate would end past ``max_minutes`` (rank 0 decides for every rank)."""
    limit = run.config.max_minutes
    if limit is None or not sweep.runs:
        return False
    used = sum(r["seconds"] for r in sweep.runs)
    over = used + used / len(sweep.runs) > 60 * limit
    return bool(_ddp.gather_objects(run.world, over)[0])


def _copy_weights(run: Run) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in run.model.net.state_dict().items()}


def at_edge(sweep: LrSweep) -> str | None:
    """``"upper"`` or ``"lower"`` when the chosen rate is the highest or lowest of two or more tried, else ``None``.

    As a classifier's C at the edge of its grid, the best may lie beyond; but the one-epoch choice favours high rates
    (:func:`featx.finetune.config.edge_words` says so), so only the lower edge asks for a wider grid."""
    tried = sorted(r["lr"] for r in sweep.runs)
    if sweep.chosen is None or len(tried) < 2:
        return None
    return "upper" if sweep.chosen == tried[-1] else "lower" if sweep.chosen == tried[0] else None


def sweep_summary(config: FinetuneConfig, sweep: LrSweep) -> LrSweepSummary:
    """The choice as ``results.json`` records it."""
    phase = config.phases[sweep.phase]
    return {
        "phase": sweep.phase + 1,
        "freeze": phase.freeze,
        "budget": f"1 epoch of phase {sweep.phase + 1} ({phase.freeze}) per candidate",
        "selected_by": sweep.selected_by,
        "candidates": sorted(sweep.order),
        "runs": sorted(sweep.runs, key=lambda r: r["lr"]),
        "cut": sorted(sweep.cut),
        "max_minutes": config.max_minutes,
        "chosen": sweep.chosen,
        "at_edge": at_edge(sweep),
        "seconds": round(sum(r["seconds"] for r in sweep.runs), 3),
    }
