"""Refit on train+val: once val has chosen a run's rate and epoch, train again on train and val together.

Internal to :mod:`featx.finetune`: the last training step of :func:`featx.finetune.trainer.finetune` under
``refit="train+val"`` (Kornblith et al. 2019 refit their probes so; Ericsson et al. 2021's code too). The
selection run (train only, val judging every epoch) has chosen the base rate and the best epoch; the refit
starts from the same initial weights (the seed's head, or for LP-FT the probe fit on train+val), trains the
phases exactly as far as the best epoch went (the same schedules, stretched over the larger epochs), at the
chosen rates, on the train and val images, and keeps its last weights: no image is left to choose with. A
best epoch of 0 (the weights before any update) refits nothing: LP-FT is then its probe refit on train+val.
A refit killed part-way starts over; the selection run before it resumes from its checkpoint as ever.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from featx._runtime import dist as _ddp
from featx.backbones.names import BackboneName
from featx.data.manifest import Manifest
from featx.finetune.artifacts import WEIGHTS, save_weights
from featx.finetune.epochs import epochs_before, setup_phase, train_epoch
from featx.finetune.prepare import Rows, Run, build_model
from featx.finetune.state import RunState

__all__ = ["epochs_to_refit", "refit_on_train_val"]


def epochs_to_refit(state: RunState, n_phases: int) -> list[int]:
    """Per phase, how many of its epochs the selection run trained up to its best epoch (a phase cut short by
    patience counts the epochs it trained; the rate choice's kept epoch is the phase's first)."""
    best = state.best_epoch or 0
    counts = [0] * n_phases
    for record in state.curves:
        if 0 < record["epoch"] <= best:
            counts[record["phase"] - 1] += 1
    return counts


def refit_on_train_val(
    selection: Run,
    state: RunState,
    name: BackboneName,
    manifest: Manifest,
    *,
    init_head: str | Path | None,
    trust: bool,
    workers: int | None,
) -> dict[str, Any]:
    """Train the selection run's recipe again on train+val up to its best epoch; write its weights as the run's.

    Parameters
    ----------
    selection : Run
        The finished selection run (train only); its output folder receives the refit's ``model.safetensors``.
    state : RunState
        Its state: the chosen base rate (``lr_base``), the best epoch and the curves.
    name, manifest
        The backbone and the planned manifest the selection run was built from.
    init_head : str or Path, optional
        LP-FT: the probe fit on train+val, which the refit's head starts from.
    trust : bool
    workers : int, optional

    Returns
    -------
    dict
        ``{"on", "epochs", "per_phase", "n", "seconds"}`` for ``results.json``'s ``refit``.
    """
    t0 = time.perf_counter()
    config, world = selection.config, selection.world
    rows = _train_plus_val(selection.rows)
    built = build_model(name, manifest, config, init_head=init_head, trust=trust, probe_on=("train", "val"))
    run = Run.start(
        world, selection.dev, config, selection.amp, selection.out, rows, built, workers=workers,
        max_pixels=selection.max_pixels,
    )  # fmt: skip
    per_phase = epochs_to_refit(state, len(config.phases))
    for phase_index, count in enumerate(per_phase):
        if not count:
            continue
        live = setup_phase(run, phase_index, config.phases[phase_index].rate(state.lr_base))
        first = epochs_before(config, phase_index)
        for epoch in range(count):
            stats = train_epoch(run, live.step_model, live.optimizer, live.scheduler, first + epoch)
            run.info("refit on train+val: phase %d epoch %d, train loss %.4f", phase_index + 1, epoch + 1, stats.loss)
    if world.is_main:
        save_weights(run.out / WEIGHTS, run.model.net)
    _ddp.barrier(world)  # the test reads these weights back on every rank
    return {
        "on": "train+val",
        "epochs": sum(per_phase),
        "per_phase": per_phase,
        "n": len(rows.train),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _train_plus_val(rows: Rows) -> Rows:
    """The rows with val moved into train (sorted, as the plan orders them) and no val left."""
    return dataclasses.replace(rows, train=np.sort(np.concatenate([rows.train, rows.val])), val=rows.val[:0])
