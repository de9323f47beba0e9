"""Fine-tuning f end to end: new head, freezing schedules, phased learning rates, LP-FT, resumable.

Phases on the same manifest and test split as the frozen-feature classifiers: train only a new head, then
unfreeze the top blocks or everything, each phase at its own rate (by default the head, then everything at half
the rate, lower blocks lower: ``DEFAULT_PHASES``, ``DEFAULT_LAYER_DECAY``). Each phase warms up linearly then
decays with a cosine (or takes its stretch of one curve over the run). Frozen blocks keep their BatchNorm layers
in eval mode, so their running statistics never move. A checkpoint is written after every epoch; a job
killed at any moment resumes from it and reaches the same weights as an uninterrupted run with the seed.

A run is a sequence of steps, and :func:`_finetune` reads as them:
:func:`~featx.finetune.prepare.build_model` (the backbone with its new head),
:func:`~featx.finetune.prepare.prepare_rows` (the splits, unreadable images dropped), :func:`restore_or_start`
(the :class:`~featx.finetune.state.RunState` in ``checkpoint.pt``, or a fresh one),
:func:`~featx.finetune.epochs.evaluate_start` (epoch 0: the weights before any update, a candidate like every
epoch), then per phase :func:`~featx.finetune.sweep.choose_rate` (at the first phase whose rate is chosen on
val) and :func:`~featx.finetune.epochs.train_phase` (each epoch: train, validate, keep the best weights,
write the checkpoint), under ``refit="train+val"`` :func:`~featx.finetune.refit.refit_on_train_val` (the chosen
rate and epochs again on train+val), :func:`test_best` and :func:`write_artifacts`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from featx._runtime import dist as _ddp
from featx._runtime.device import resolve_amp
from featx._runtime.io import check_writable
from featx._runtime.malloc import reuse_freed_memory
from featx._runtime.progress import Progress
from featx.backbones.names import resolve_backbone
from featx.data.manifest import Manifest
from featx.data.splits import FinalFit, SplitPlan
from featx.exceptions import DamagedFileError, SpecMismatchError
from featx.finetune.artifacts import CHECKPOINT, FINETUNE_META, WEIGHTS, config_hash, save_json
from featx.finetune.config import FinetuneConfig
from featx.finetune.data import EvalImages
from featx.finetune.epochs import evaluate_start, predict, train_phase
from featx.finetune.heads import block_family, model_label
from featx.finetune.prepare import Run, build_model, load_manifest, prepare_rows
from featx.finetune.refit import refit_on_train_val
from featx.finetune.state import RunState, read_checkpoint, save_checkpoint
from featx.finetune.sweep import choose_rate, needs_choice, sweep_summary
from featx.metrics import evaluate, predictions
from featx.results import (
    CellInfo,
    FinetuneResults,
    TestMetrics,
    TrainSummary,
    ValScore,
    assemble,
    header,
    metrics_section,
    split_section,
    write_results,
)
from featx.spec import DEFAULT_MAX_PIXELS

__all__ = ["finetune"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the API
def finetune(
    source: str | Path | Manifest,
    backbone: str,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    init_head: str | Path | None = None,
    trust: bool = False,
    device: str = "auto",
    amp: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plan: SplitPlan | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cell: CellInfo | None = None,
    refit: str = "train",
) -> FinetuneResults:
    """Fine-tune a backbone on a source's train split, validate each epoch, test the best epoch once.

    The weights before any update are epoch 0, a candidate like every epoch (LP-FT never ends below its
    starting head on val: the probe, folded with its near-dead features floored, ``config.probe_scale_floor``).
    A phase whose rate is ``auto`` (or every phase, under ``config.lr="auto"``) has its base
    rate chosen on val first (:mod:`featx.finetune.sweep`).

    Writes into ``out_dir``: ``checkpoint.pt`` (every epoch; resumes a killed run; at the end only the run's
    record, without weights, which a new call with the same settings finds finished), ``model.safetensors``
    (the best weights, loadable as ``file:ARCH=PATH`` for extraction when the head is linear),
    ``finetune.json`` (how to rebuild it: :func:`~featx.finetune.load_finetuned`) and ``results.json``
    (curves and test metrics, the schema of ``featx train``: :class:`featx.results.FinetuneResults`).
    Each file is written atomically. Called again on a folder that holds a checkpoint of the same run
    (same data, backbone and config), it resumes after the last finished epoch.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each rank trains on its part of every global
    batch with :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on CUDA, gloo on the CPU);
    ``config.batch_size`` stays the global batch, so the run follows the single-process one (see
    ``docs/distributed.md``). Only rank 0 writes files; every rank returns the same results.

    Parameters
    ----------
    source : str, Path or Manifest
        An image folder, CSV/TSV manifest, ``.txt`` file list, ``digits`` or ``torchvision:NAME`` (see
        :func:`featx.data.sources.load_source`), or a manifest. Training uses its ``train`` rows, epochs are
        chosen on its ``val`` rows and the best epoch is tested once on its ``test`` rows (the splits of
        ``plan``, which carves what the source lacks).
    backbone : str
        ``SOURCE:NAME[.TAG]`` or ``file:ARCH=PATH`` (see :mod:`featx.backbones`); the network must end in
        a linear classifier, which a new head replaces.
    config : FinetuneConfig
        Phases, optimiser, head, augmentation, patience, seed: everything that defines the run (its hash
        guards resuming).
    out_dir : str or Path
        The folder the run writes into (created if needed).
    init_head : str or Path, optional
        LP-FT: a ``featx train -c logreg`` ``model.skops`` on this backbone's ``penultimate`` features; the
        linear head starts as that regression (:func:`~featx.finetune.head_from_logreg`; exactly with
        ``config.probe_scale_floor=0``, else with its near-dead features floored). Not with ``config.hidden``.
    trust : bool, default=False
        Load an ``init_head`` file that holds types which could run code.
    device : str, default="auto"
        ``auto`` (the first CUDA GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; under
        torchrun each rank takes ``cuda:LOCAL_RANK``.
    amp : {"auto", "bf16", "fp16", "none"}, default="auto"
        Autocast precision; ``auto`` is bf16 (fp16 where unsupported) on CUDA and none elsewhere.
    workers : int, optional
        DataLoader worker processes per rank; by default one per spare CPU core.
    overwrite : bool, default=False
        Start afresh when ``out_dir`` holds a checkpoint of a run with other settings.
    progress : bool, default=True
        Show progress (rank 0 only): bars of the epochs and of each epoch's batches on a terminal, a log line
        every tenth of the run (and every 30 s within an epoch) elsewhere.
    plan : SplitPlan, optional
        How train / val / test are carved (the default plan when ``None``): the same plan as the classifiers'
        (``featx train``) gives the same images.
    max_pixels : int, default=DEFAULT_MAX_PIXELS
        Images with more pixels are refused as unreadable (decompression-bomb guard) and skipped.
    cell : CellInfo, optional
        Which cell of a ``featx run`` job this is, recorded in the results (written once, never amended).
    refit : {"train", "train+val"}, default="train"
        ``train``: the tested model is the best epoch of the run on train. ``train+val``: that run chooses the
        rate and the number of epochs on val, then the recipe trains again from the start on train and val
        for that many epochs at that rate, and its last weights are tested (:mod:`featx.finetune.refit`; the
        results' ``refit`` says what it trained). With ``init_head``, give the ``model.skops`` of
        ``featx train --refit train+val``: the run on train starts from its ``model-train.skops`` (the probe
        val has not seen), the refit from the probe fit on train+val.

    Returns
    -------
    FinetuneResults
        The results written to ``results.json``: test metrics under ``"test"`` (``None`` without a test
        split), per-epoch curves under ``"curves"`` (from epoch 0), the chosen epoch under ``"best_epoch"``,
        the choice of the learning rate under ``"lr_sweep"`` (when there is one).

    Raises
    ------
    ValueError
        Fewer than two classes in the training split, a network without a linear head, an ``init_head``
        with an MLP head or that cannot be folded into a linear one, or a bad ``amp`` or ``device``.
    UnknownNameError
        An unknown backbone, or a ``topK`` phase with more blocks than the backbone has.
    SpecMismatchError
        ``out_dir`` holds a run with other settings (and ``overwrite`` is off), or ``init_head`` was trained
        on another backbone or other classes.
    FileNotFoundError
        The source or ``init_head`` does not exist.
    NotWritableError
        ``out_dir`` cannot be created or written (checked before anything loads).
    RuntimeError
        Under torchrun, ranks that see different data or different checkpoints (``out_dir`` must be on a
        filesystem every node sees); weights that cannot be downloaded.

    Examples
    --------
    >>> from featx.finetune import FinetuneConfig, finetune, parse_phases
    >>> config = FinetuneConfig(phases=tuple(parse_phases("head:3:1e-3,top2:5:1e-4")), batch_size=32)
    >>> results = finetune("data/hymenoptera", "featx:efficientnet_lite0", config, "runs/ft")  # doctest: +SKIP
    >>> results["best_epoch"], results["test"]["accuracy"]  # doctest: +SKIP
    (7, 0.9412)
    """
    world, dev = _ddp.init(device)
    try:
        # Training seeds torch's RNG (dropout masks, DataLoader seeds); the caller's stream is left as it was.
        with (
            torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
            reuse_freed_memory(dev.type == "cpu"),  # CPU training frees and re-faults big activations per step
        ):
            return _finetune(
                world,
                dev,
                source,
                backbone,
                config,
                Path(out_dir),
                init_head=init_head,
                trust=trust,
                amp=amp,
                workers=workers,
                overwrite=overwrite,
                progress=progress,
                plan=plan,
                max_pixels=max_pixels,
                cell=cell,
                refit=FinalFit(refit).refit,
            )
    finally:
        _ddp.close(world)


def _finetune(
    world: _ddp.World,
    dev: torch.device,
    source: str | Path | Manifest,
    backbone: str,
    config: FinetuneConfig,
    out: Path,
    *,
    init_head: str | Path | None,
    trust: bool,
    amp: str,
    workers: int | None,
    overwrite: bool,
    progress: bool,
    plan: SplitPlan | None,
    max_pixels: int,
    cell: CellInfo | None,
    refit: str,
) -> FinetuneResults:
    """Check, prepare, restore, train every phase, (refit,) test the best epoch, write the artifacts."""
    t_start = time.perf_counter()
    check_writable(out, "out_dir")  # before the network loads; on every rank, so that all of them stop
    amp = resolve_amp(amp, dev)
    name = resolve_backbone(backbone)
    manifest = load_manifest(source, plan)
    selection_head = _train_only_probe(init_head) if init_head is not None and refit == "train+val" else init_head
    built = build_model(name, manifest, config, init_head=selection_head, trust=trust)
    rows = prepare_rows(world, manifest, plan or SplitPlan(), max_pixels, built.net.preprocessing)
    run_hash = config_hash(config, built.net, rows.fingerprint, built.init_ref, refit)
    state = restore_or_start(world, out, run_hash, overwrite=overwrite)
    state.start_clock(t_start)  # a resumed run adds this process's seconds to those its checkpoint recorded
    run = Run.start(
        world, dev, config, amp, out, rows, built, workers=workers, max_pixels=max_pixels, progress=progress
    )
    if state.model is not None:
        run.model.net.load_state_dict(state.model)
        run.info("resuming %s at phase %d, epoch %d", out, state.phase + 1, state.epoch_in_phase + 1)
    done = sum(p.epochs for p in config.phases[: state.phase]) + state.epoch_in_phase
    total = sum(p.epochs for p in config.phases)
    with Progress(total, initial=done, unit="epoch", desc="finetune", disable=not run.progress) as bar:
        if not state.curves:  # a fresh run (a resumed one has recorded its epoch 0, or predates it)
            evaluate_start(run, state)
        for phase_index in range(state.phase, len(config.phases)):
            live = choose_rate(run, state, phase_index, bar) if needs_choice(config, state, phase_index) else None
            if state.phase == phase_index:  # the chosen candidate's epoch may have ended the phase
                train_phase(run, state, phase_index, bar, live)
    refitted = None
    if refit == "train+val":
        refitted = refit_on_train_val(run, state, name, manifest, init_head=init_head, trust=trust, workers=workers)
    test = test_best(run)
    return write_artifacts(run, state, test, seconds=state.elapsed(), refit=refitted, cell=cell)


def _train_only_probe(init_head: str | Path) -> Path:
    """The probe fit on train alone beside a ``featx train --refit train+val`` model (the run on train starts
    from it: val, which judges that run, must not have been fit)."""
    from featx.classify.training import TRAIN_ONLY_MODEL

    path = Path(init_head).parent / TRAIN_ONLY_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"--refit train+val with --init-head {init_head}: {path} is missing; the run on train needs the probe "
            "fit on train alone, which `featx train --refit train+val` writes beside model.skops"
        )
    return path


# ---------------------------------------------------------------------------------------- the steps
def restore_or_start(world: _ddp.World, out: Path, run_hash: str, *, overwrite: bool) -> RunState:
    """The state saved in ``out/checkpoint.pt`` when it belongs to this run, else a fresh one.

    A checkpoint of another run (other data, backbone or config) is refused unless ``overwrite``; a damaged
    one (truncated, not a featx checkpoint) is named and the run starts afresh, its next checkpoint replacing
    it. Every rank must find the same checkpoint, or ``--out`` is not one folder all nodes see.
    """
    out.mkdir(parents=True, exist_ok=True)
    try:
        saved = read_checkpoint(out / CHECKPOINT)
    except DamagedFileError as exc:
        if world.is_main:
            log.warning("%s; the run starts afresh and its first checkpoint replaces it", exc)
        saved = None
    if saved is not None and saved.get("run_hash") != run_hash:
        if not overwrite:
            raise SpecMismatchError(
                f"{out} holds a fine-tuning run with other settings (data, backbone or config); pass --overwrite "
                "to start afresh, or choose another --out"
            )
        saved = None
    state = RunState(run_hash) if saved is None else RunState.from_checkpoint(saved)
    positions = _ddp.gather_objects(world, None if saved is None else (state.phase, state.epoch_in_phase))
    if len(set(positions)) > 1:
        raise RuntimeError(
            f"the ranks found different checkpoints in {out} (per rank: {positions}); --out must be a folder "
            "on a filesystem that every node sees"
        )
    return state


def test_best(run: Run) -> TestMetrics | None:
    """Load the best epoch's weights and test them once (``None`` when the source has no test rows)."""
    from safetensors.torch import load_file

    run.model.net.load_state_dict(load_file(str(run.out / WEIGHTS)))
    rows, manifest = run.rows.test, run.rows.manifest
    if not len(rows):
        return None
    images = EvalImages(
        [manifest.paths[r] for r in rows], manifest.labels[rows], run.model.preprocessing, run.max_pixels
    )
    t0 = time.perf_counter()
    scores, y_test, _ = predict(run, images)
    predict_seconds = time.perf_counter() - t0
    y_pred = scores.argmax(1)
    return metrics_section(
        evaluate(y_test, y_pred, manifest.class_names, scores=scores),
        predictions([manifest.ids[r] for r in rows], y_test, y_pred, scores),
        predict_seconds=predict_seconds,
    )


def write_artifacts(
    run: Run,
    state: RunState,
    test: TestMetrics | None,
    *,
    seconds: float,
    refit: dict[str, Any] | None = None,
    cell: CellInfo | None = None,
) -> FinetuneResults:
    """Write ``finetune.json`` and ``results.json`` (rank 0), then shrink ``checkpoint.pt`` to the run's record;
    wait for them on every rank, return the results.

    ``refit``: what the refit on train+val trained (:func:`~featx.finetune.refit.refit_on_train_val`), if any."""
    meta = _finetune_meta(run, state)
    results = _results(run, state, test, seconds=seconds, refit=refit, cell=cell)
    if run.world.is_main:
        save_json(run.out / FINETUNE_META, meta)
        write_results(run.out / "results.json", results)
        # Last, once the weights and results are on disk: the optimiser and last-epoch weights (27 MB for
        # EfficientNet-Lite0) resume nothing now, while the record still guards the folder against another run.
        save_checkpoint(run.out / CHECKPOINT, state.without_weights())
    _ddp.barrier(run.world)  # no rank returns (or exits) before the files are there
    return results


def _finetune_meta(run: Run, state: RunState) -> dict[str, Any]:
    """``finetune.json``: what :func:`~featx.finetune.load_finetuned` needs to rebuild the network."""
    built, config = run.built, run.config
    family = block_family(built.net)
    return {
        "format": "featx.finetuned",
        "format_version": 1,
        "backbone": built.net.name,
        "architecture": family,
        "weights_sha256_before": built.net.weights_sha256,
        "class_names": run.rows.manifest.class_names,
        "preprocessing": dataclasses.asdict(run.model.preprocessing),
        "head": {"name": built.head_name, "hidden": list(config.hidden), "dropout": config.dropout},
        "config": config.to_dict(),
        "init_head": built.init_ref,
        "best_epoch": state.best_epoch,
        "lr_chosen": state.lr_base,
        "extract_with": f"file:{family}={(run.out / WEIGHTS).resolve()}" if not config.hidden else None,
    }


def _phases_run(config: FinetuneConfig, base: float | None) -> list[dict[str, Any]]:
    """The phases with the peak rates they trained at; a rate chosen on val keeps its factor as ``lr_auto``."""
    return [
        {"freeze": p.freeze, "epochs": p.epochs, "lr": p.rate(base)} | ({"lr_auto": p.lr} if p.auto else {})
        for p in config.phases
    ]


def _val_score(state: RunState, n: int) -> ValScore | None:
    """The chosen epoch's val accuracy, the score a comparison chooses its rows by (``None`` without val images)."""
    record = next((c for c in state.curves if c["epoch"] == state.best_epoch), None)
    if record is None or record.get("val_accuracy") is None or not n:
        return None
    return ValScore(accuracy=float(record["val_accuracy"]), n=n)


def _fit_seconds(state: RunState) -> float:
    """Training seconds: every recorded epoch, and the candidates the rate choice did not keep."""
    sweep = state.lr_sweep
    others = sum(r["seconds"] for r in sweep.runs if r["lr"] != sweep.chosen) if sweep else 0.0
    return round(sum(c["seconds"] for c in state.curves) + others, 3)


def _results(
    run: Run,
    state: RunState,
    test: TestMetrics | None,
    *,
    seconds: float,
    refit: dict[str, Any] | None,
    cell: CellInfo | None = None,
) -> FinetuneResults:
    """The run's results document (:class:`featx.results.FinetuneResults`)."""
    built, config, rows = run.built, run.config, run.rows
    kind = "lp-ft" if built.init_ref else "finetune"
    own = {
        "store": None,
        "source": rows.manifest.source,
        "split_policy": rows.manifest.split_policy,
        "val_policy": rows.val_policy,
        "manifest_fingerprint": rows.fingerprint,
        "backbone": built.net.name,
        "finetune": {
            **config.to_dict(),
            "phases": _phases_run(config, state.lr_base),
            "lr_chosen": state.lr_base,
            "blocks": len(built.blocks),
            "init_head": built.init_ref,
            "amp": run.amp,
            "device": str(run.dev),
            "world_size": run.world.size,
        },
        "curves": state.curves,
        "best_epoch": state.best_epoch,
        "skipped_images": [{"id": i, "reason": r} for i, r in rows.skipped],
        **({"refit": refit} if refit is not None else {}),
        **({} if state.lr_sweep is None else {"lr_sweep": sweep_summary(config, state.lr_sweep)}),
        "seconds": round(seconds, 3),
    }
    sizes = {"train": len(rows.train), "val": len(rows.val), "test": len(rows.test)}
    return assemble(
        header("finetune", f"{kind}[{config.label}] · {model_label(built.net.parsed)}", cell=cell),
        own,
        split=split_section(
            rows.plan, rows.manifest.split_policy, rows.split_hashes, sizes, "train" if refit is None else refit["on"]
        ),
        train=TrainSummary(
            n=len(rows.train),
            val_n=len(rows.val),
            fit_seconds=round(_fit_seconds(state) + (refit["seconds"] if refit else 0.0), 3),
        ),
        val=_val_score(state, len(rows.val)),
        test=test,
    )
