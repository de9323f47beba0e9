"""What defines a fine-tuning run: its phases (what trains, how long, at which rate) and :class:`FinetuneConfig`.

Every option is checked here, once, when the config is built; the CLI, the job files and the Python API
all build one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx._runtime.params import INT32_MAX, SEED_MAX, Choices, Constraint, Flag, Interval, Items, check_options, option
from featx.exceptions import InvalidOptionError
from featx.spec import canonical_json

__all__ = [
    "DEFAULT_LAYER_DECAY",
    "DEFAULT_LR_CANDIDATES",
    "DEFAULT_PHASES",
    "DEFAULT_PROBE_SCALE_FLOOR",
    "FINETUNE_VERSION",
    "SCHEDULES",
    "FinetuneConfig",
    "Phase",
    "edge_words",
    "parse_phases",
]


#: fastai's fine_tune recipe in featx's phases: the new head alone for 2 epochs, then everything for 6 at half the
#: base rate (chosen on val like C), lower blocks lower (DEFAULT_LAYER_DECAY). Chosen on val against the classic
#: phased recipe (head:3, top2:5 at a tenth, all:5 at a hundredth) on the same splits: val 0.965 against 0.739 on
#: digits, 0.788 against 0.756 on a CIFAR-10 subset, 0.980 against 0.959 on hymenoptera (one image), in less time
#: (benchmarks/RESULTS.md, "Defaults chosen on val").
DEFAULT_PHASES = "head:2:auto,all:6:auto/2"


#: Each backbone block below the top at half the rate of the one above. Chosen on val, in the default recipe against
#: no decay: 0.788 against 0.656 on a CIFAR-10 subset, one val image fewer on digits (0.965 against 0.969), a tie on
#: hymenoptera (0.980); the highest mean val accuracy of the three (benchmarks/RESULTS.md, "Defaults chosen on val").
DEFAULT_LAYER_DECAY = 0.5


#: The base rates an ``auto`` learning rate is chosen from on val, per optimiser: three log-spaced rates around
#: those issue 15 measured working (SGD: head 1e-2 then all 3e-3 reached 0.961 on digits; the hymenoptera
#: pipeline needed ten times the default 1e-3), AdamW's ten times lower as its steps are larger. Chosen on val: one
#: step higher (3e-3, 1e-2, 3e-2) the default recipe chose 3e-2 on all three study sets and lost 32.4 and 13.1 pt of
#: val on digits and a CIFAR-10 subset for a tie on hymenoptera (benchmarks/RESULTS.md, "Defaults chosen on val").
DEFAULT_LR_CANDIDATES = {"sgd": (1e-3, 3e-3, 1e-2), "adamw": (1e-4, 3e-4, 1e-3)}


#: How the rate moves: one warm-up + cosine per phase, or one over the whole run (see :class:`FinetuneConfig`).
#: Per phase is the default, chosen on val: over the run, the default recipe scored 10.1 pt lower on digits and one
#: val image lower on a CIFAR-10 subset and on hymenoptera (benchmarks/RESULTS.md, "Defaults chosen on val").
SCHEDULES = ("phase", "run")


def edge_words(at_edge: str | None) -> str:
    """How a results row or the CLI says the chosen base rate is at an edge of the candidates (``""`` if not)."""
    if at_edge is None:
        return ""
    if at_edge == "lower":
        return " (the lowest candidate: a lower rate may do better; widen --lr-candidates)"
    # One epoch favours high rates: a grid one step higher chose 3e-2 and lost 13 and 32 pt of val on CIFAR-10 and
    # digits (benchmarks/RESULTS.md, "Defaults chosen on val"), so the highest is not a call to go higher.
    return " (the highest candidate; the one-epoch choice favours high rates, so a higher one is not likely better)"


#: LP-FT folds its probe's standardisation into the head with each feature's std floored at this times the median
#: std (``probe_scale_floor``): an exact fold gave digits' probe weights up to 4,741 on channels Lite0 almost never
#: activates there, and every LP-FT from it diverged or stayed at the probe (benchmarks/RESULTS.md, issue 24).
DEFAULT_PROBE_SCALE_FLOOR = 0.3

#: Bumped when a code change alters what a fine-tuning run with the same settings trains to. Left out of
#: :meth:`FinetuneConfig.identity` at 1, so checkpoints and cells written before it existed keep their hash.
FINETUNE_VERSION = 1

#: Options added after resuming was introduced, each with the value that trains as featx did before it (as
#: ``to_dict`` writes it): at that value an option stays out of the identity, so a run killed under an older featx
#: resumes under this one and its pipeline cell stays cached.
_ADDED_LATER: dict[str, Any] = {
    "flip": True,
    "lr": "phases",
    "lr_candidates": [],
    "layer_decay": 1.0,
    "schedule": "phase",
    "probe_scale_floor": 0.0,
}

#: Options that shape only an LP-FT run (one with ``init_head``): a plain fine-tune's identity leaves them out.
_LP_FT_ONLY = ("probe_scale_floor",)

#: Options that never enter the identity: ``max_minutes`` caps the rate choice, whose outcome the checkpoint
#: records, so a run resumed under another cap goes on with the choices it made.
_NOT_IN_IDENTITY = ("max_minutes",)


_PHASE_RE = re.compile(r"^(head|all|top(\d+)):(\d+):(\S+)$")
_AUTO_RE = re.compile(r"^auto(?:([*/])([0-9.eE+-]+))?$")


# ------------------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class Phase:
    """One training phase: what is trainable, for how many epochs, at which peak learning rate.

    ``freeze`` is ``head`` (only the new head trains), ``topK`` (the last K backbone blocks and the head)
    or ``all`` (everything trains). With ``auto``, ``lr`` is a factor of the base rate chosen on val (the
    phase string's ``auto``, ``auto/10``, ``auto*3``), not a rate.
    """

    freeze: str
    epochs: int
    lr: float
    auto: bool = False

    def __post_init__(self) -> None:
        if not (self.freeze in ("head", "all") or re.fullmatch(r"top[1-9]\d*", self.freeze)):
            raise ValueError(f"phase freezing {self.freeze!r}: use head, topK (e.g. top2) or all")
        if self.epochs < 1:
            raise ValueError(f"phase {self.freeze} needs at least one epoch, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"phase {self.freeze} needs a positive learning rate, got {self.lr}")

    @property
    def label(self) -> str:
        """The phase's name in a results row (its freezing: ``head``, ``top2``, ``all``)."""
        return self.freeze

    def rate(self, base: float | None) -> float:
        """The phase's peak learning rate, given the base rate chosen on val (``None`` before the choice)."""
        if not self.auto:
            return self.lr
        if base is None:
            raise RuntimeError(f"phase {self.freeze}'s learning rate is chosen on val, and it has not been chosen yet")
        return self.lr * base

    def to_dict(self) -> dict[str, Any]:
        """``{"freeze", "epochs", "lr"}``, plus ``"auto": true`` for a rate relative to the chosen one (left out
        otherwise, as featx wrote phases before rates were chosen)."""
        d: dict[str, Any] = {"freeze": self.freeze, "epochs": self.epochs, "lr": self.lr}
        return {**d, "auto": True} if self.auto else d


def _phase_lr(text: str, where: str) -> tuple[float, bool]:
    """A phase's LR field: a rate, or ``auto`` optionally times (``*F``) or over (``/F``) a factor."""
    m = _AUTO_RE.match(text)
    try:
        if m is None:
            return float(text), False
        if m.group(1) is None:
            return 1.0, True
        factor = float(m.group(2))
    except ValueError:
        raise ValueError(
            f"{where}: {text!r} is not a learning rate (a number, or auto, auto/10, auto*3: a factor of the rate "
            "chosen on val)"
        ) from None
    if not factor > 0:
        raise ValueError(f"{where}: {text!r} needs a positive factor")
    return (factor if m.group(1) == "*" else 1.0 / factor), True


def parse_phases(spec: str | Path) -> list[Phase]:
    """``"head:3:1e-3,top2:5:1e-4,all:5:1e-5"`` (FREEZE:EPOCHS:LR, comma-separated) or a TOML file.

    LR is a rate, or ``auto`` (the base rate chosen on val, see :class:`FinetuneConfig`), ``auto/10`` or
    ``auto*3`` (that rate over or times a factor): ``"head:1:auto,all:3:auto/3"``. A TOML file holds
    ``[[phase]]`` tables with ``freeze``, ``epochs`` and ``lr`` (a number or such a string).
    """
    text = str(spec)
    path = Path(text)
    if path.suffix == ".toml":
        if not path.is_file():
            raise FileNotFoundError(f"phases file {text!r} does not exist")
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        tables = data.get("phase")
        if not isinstance(tables, list) or not tables:
            raise ValueError(f"{text}: expected [[phase]] tables with freeze, epochs and lr")
        phases = []
        for i, table in enumerate(tables, 1):
            extra = set(table) - {"freeze", "epochs", "lr"}
            if extra or not {"freeze", "epochs", "lr"} <= set(table):
                raise ValueError(f"{text}: phase {i} must have exactly freeze, epochs and lr (got {sorted(table)})")
            lr, auto = _phase_lr(str(table["lr"]), f"{text}: phase {i}")
            phases.append(Phase(str(table["freeze"]), int(table["epochs"]), lr, auto))
        return phases
    phases = []
    for part in (p.strip() for p in text.split(",")):
        m = _PHASE_RE.match(part)
        if not m:
            raise ValueError(
                f"phase {part!r} is not FREEZE:EPOCHS:LR (FREEZE = head, topK or all), "
                'e.g. "head:3:1e-3,top2:5:1e-4,all:5:1e-5"'
            )
        lr, auto = _phase_lr(m.group(4), f"phase {part!r}")
        phases.append(Phase(m.group(1), int(m.group(3)), lr, auto))
    return phases


# ------------------------------------------------------------------------------------------- config
class _Phases(Constraint):
    """One or more :class:`Phase`; written as a phase string or a ``.toml`` file (:func:`parse_phases`)."""

    metavar = "PHASES"
    explains = True

    def allows(self, value: Any) -> bool:
        return isinstance(value, tuple) and bool(value) and all(isinstance(p, Phase) for p in value)

    def words(self) -> str:
        return 'one or more phases FREEZE:EPOCHS:LR, e.g. "head:3:1e-3,all:5:1e-4"'

    def from_text(self, text: str) -> Any:
        return tuple(parse_phases(text))


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (its hash guards resuming).

    Each option's allowed values, default and help are in its field (:func:`featx._runtime.params.option`):
    the CLI's options and the pipelines' ``[[finetune]]`` keys are generated from them, and building a config
    checks them all, once.

    Parameters
    ----------
    phases : tuple of Phase, default=parse_phases(DEFAULT_PHASES)
        A pipeline or the command line may give the phase string (or ``.toml`` file) instead.
    batch_size : int, default=32
    optimizer : {"sgd", "adamw"}, default="sgd"
        SGD with momentum 0.9 (Nesterov), or AdamW.
    weight_decay : float, default=1e-4
        Not applied to biases and normalisation parameters.
    label_smoothing : float, default=0.0
    clip_grad : float, default=0.0
        Max gradient norm; 0 disables clipping.
    backbone_lr_mult : float, default=1.0
        The backbone's learning rate relative to the head's.
    layer_decay : float, default=DEFAULT_LAYER_DECAY (0.5)
        Discriminative rates by depth: the top backbone block trains at the backbone's rate, each block below at
        ``layer_decay`` times the one above (the stem, lowest, at ``layer_decay ** (blocks - 1)``), as timm's
        layer-wise decay does; 1 gives every block the same rate (featx's only choice before 0.5 was measured).
    warmup : float, default=0.1
        Share of the schedule's steps spent warming up linearly (of each phase's, or of the run's).
    schedule : {"phase", "run"}, default="phase"
        ``phase``: each phase warms up and decays with its own cosine from its peak rate. ``run``: one warm-up and
        one cosine over the whole run's steps, each phase's peak rate scaled by where the run is on it.
    hidden : tuple of int, default=()
        Hidden sizes of an MLP head; empty for a linear head.
    dropout : float, default=0.0
    crop_scale : tuple of float, default=(0.25, 1.0)
        Area range of the random resized crop.
    flip : bool, default=True
        Flip training images horizontally at random; turn it off where a mirror image changes the label
        (digits, text, left/right classes).
    patience : int, optional
        End a phase after this many epochs without improving the monitored metric.
    metric : {"val_accuracy", "val_loss"}, default="val_accuracy"
        What chooses the epoch kept. By val loss, the default recipe kept a test accuracy 0.7 pt higher on
        hymenoptera (p = 1) and the same epoch on a CIFAR-10 subset (benchmarks/RESULTS.md).
    lr : {"phases", "auto"}, default="phases"
        ``phases``: the rates the phases give (a phase written ``auto`` has its rate chosen on val all the
        same). ``auto``: the base rate is chosen on val and every phase's rate is its written rate times
        (chosen / the first phase's written rate): the phases give the ratios.
    lr_candidates : tuple of float, default=()
        The base rates to choose from; empty for the optimiser's :data:`DEFAULT_LR_CANDIDATES`. Each trains
        the first epoch of the first ``auto`` phase from the same weights on the same batches; the best on val
        (val loss for a val split under 200 images, val accuracy then loss otherwise) goes on to the full
        schedule from that epoch, so the choice costs one epoch per other candidate.
    max_minutes : float, optional
        Cap on the rate choice's minutes: a candidate that would end past it is not tried (the results list
        it as cut); the first always is. It is not part of the run's hash: a resumed run keeps the choices
        its checkpoint recorded.
    seed : int, default=0
    probe_scale_floor : float, default=DEFAULT_PROBE_SCALE_FLOOR (0.3)
        LP-FT only (``init_head``): before the probe's standardisation is folded into the head, each feature's
        standard deviation is floored at this times their median, so that no near-dead channel gets a weight of
        thousands; 0 folds exactly (the head is then the probe to float rounding).
    update_bn_stats : bool, default=False
        Let unfrozen BatchNorm layers update their running statistics. Off by default, as the Keras
        transfer-learning guide advises: on small or shifted data, batch statistics drift and wreck the
        pretrained features (LP-FT on digits fell from 0.96 to 0.28 with them on).
    """

    phases: tuple[Phase, ...] = option(
        tuple(parse_phases(DEFAULT_PHASES)),
        _Phases(),
        help="FREEZE:EPOCHS:LR,… with FREEZE = head, topK or all, LR a rate or auto (auto/10, auto*3: a factor of "
        "the rate chosen on val); or a .toml file of [[phase]] tables.",
        show_default=DEFAULT_PHASES,
    )
    batch_size: int = option(32, Interval(True, 1, INT32_MAX), help="Images per step (global under torchrun).")
    optimizer: str = option("sgd", Choices(("sgd", "adamw")), help="SGD with Nesterov momentum 0.9, or AdamW.")
    weight_decay: float = option(
        1e-4, Interval(False, 0), help="Weight decay (not on biases and normalisation parameters)."
    )
    label_smoothing: float = option(0.0, Interval(False, 0, 1, "left"), help="Label smoothing of the loss.")
    clip_grad: float = option(0.0, Interval(False, 0), help="Max gradient norm (0: off).")
    backbone_lr_mult: float = option(
        1.0, Interval(False, 0, None, "neither"), help="The backbone's learning rate relative to the head's."
    )
    layer_decay: float = option(
        DEFAULT_LAYER_DECAY,
        Interval(False, 0, 1, "right"),
        help="Each backbone block below the top trains at this times the rate of the one above (1: no decay).",
    )
    warmup: float = option(0.1, Interval(False, 0, 1, "left"), help="Share of the schedule's steps spent warming up.")
    schedule: str = option(
        "phase", Choices(SCHEDULES), help="phase: a warm-up + cosine per phase; run: one over the whole run."
    )
    hidden: tuple[int, ...] = option(
        (),
        Items(Interval(True, 1), example="512,256"),
        help="Hidden sizes of an MLP head, e.g. 512,256 [default: linear head].",
        show_default=False,
    )
    dropout: float = option(0.0, Interval(False, 0, 1, "left"), help="Dropout before the head's last layer.")
    crop_scale: tuple[float, float] = option(
        (0.25, 1.0),
        Items(Interval(False, 0, 1, "right"), low=2, high=2, example="0.25,1.0"),
        help="Area range MIN,MAX of the training random resized crop.",
        show_default="0.25,1.0",
    )
    flip: bool = option(
        True,
        Flag(),
        help="Flip training images horizontally at random; --no-flip where a mirror image changes the label (digits).",
    )
    patience: int | None = option(
        None,
        None,
        Interval(True, 1),
        help="End a phase after N epochs without gain.",
        show_default=False,
    )
    metric: str = option(
        "val_accuracy", Choices(("val_accuracy", "val_loss")), help="What chooses the epoch kept, on val."
    )
    lr: str = option(
        "phases",
        Choices(("phases", "auto")),
        help="auto: choose the base rate on val (the phases' rates become ratios to the first's); phases: as "
        "written. A phase's LR may also be auto, auto/10, auto*3.",
    )
    lr_candidates: tuple[float, ...] = option(
        (),
        Items(Interval(False, 0, None, "neither"), distinct=True, example="1e-3,3e-3,1e-2"),
        help="Base rates to choose from, e.g. 1e-3,3e-3,1e-2 [default: sgd 1e-3,3e-3,1e-2; adamw 1e-4,3e-4,1e-3].",
        show_default=False,
    )
    max_minutes: float | None = option(
        None,
        None,
        Interval(False, 0, None, "neither"),
        help="Cap on the rate choice: candidates that would end past it are not tried (the results say which).",
        show_default=False,
    )
    seed: int = option(
        0,
        Interval(True, 0, SEED_MAX),
        help="Training seed (head init, batches, augmentation).",
        pipeline=False,
    )
    probe_scale_floor: float = option(
        DEFAULT_PROBE_SCALE_FLOOR,
        Interval(False, 0, 1, "both"),
        help="LP-FT: floor each feature's std at this times the median before folding the probe into the head "
        "(0: exact).",
    )
    update_bn_stats: bool = option(
        False,
        Flag(),
        help="Let unfrozen BatchNorm layers update their running statistics (kept fixed by default).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.phases, str | Path):  # a pipeline's or a command line's phase string (or .toml file)
            object.__setattr__(self, "phases", tuple(parse_phases(self.phases)))
        check_options(self)  # every option against its table, once
        self._check_lr()
        if self.crop_scale[0] > self.crop_scale[1]:
            raise InvalidOptionError(
                "crop_scale", f"crop_scale must be MIN,MAX with MIN <= MAX; got {list(self.crop_scale)}"
            )

    def _check_lr(self) -> None:
        """Check the rate options; under ``lr="auto"`` make the phases' rates factors of the first's."""
        autos = {p.auto for p in self.phases}
        if self.lr == "auto" and autos == {False}:
            first = self.phases[0].lr
            relative = tuple(Phase(p.freeze, p.epochs, p.lr / first, auto=True) for p in self.phases)
            object.__setattr__(self, "phases", relative)  # frozen: the one place the phases are rewritten
        elif self.lr == "auto" and autos == {True, False}:
            raise InvalidOptionError(
                "lr",
                "lr auto makes every phase's rate a factor of the first's; --phases already writes auto for some "
                "phases, so give the others as auto too (auto/10, …) or leave lr at phases",
            )
        candidates = self.lr_candidates
        if len(candidates) == 1:
            raise InvalidOptionError(
                "lr_candidates",
                f"lr_candidates must be two or more rates to choose from (or none); got {list(candidates)}",
            )
        if (candidates or self.max_minutes is not None) and not self.sweeps:
            raise InvalidOptionError(
                "lr_candidates" if candidates else "max_minutes",
                "lr candidates and max minutes shape the choice of the learning rate on val, and no rate is chosen: "
                "pass lr auto, or write auto as a phase's rate (head:1:auto,all:3:auto/3)",
            )

    @property
    def sweeps(self) -> bool:
        """Whether the base learning rate is chosen on val (a phase's rate is ``auto``)."""
        return any(p.auto for p in self.phases)

    @property
    def candidates(self) -> tuple[float, ...]:
        """The base rates the choice tries, ascending."""
        return tuple(sorted(self.lr_candidates or DEFAULT_LR_CANDIDATES[self.optimizer]))

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (phases as dicts, tuples as lists), as results and hashes record it."""
        d = dataclasses.asdict(self)
        d["phases"] = [p.to_dict() for p in self.phases]
        return json.loads(canonical_json(d))

    def identity(self, lp_ft: bool) -> dict[str, Any]:
        """What makes two fine-tuning runs the same (with the data, backbone and LP-FT head beside it): the
        settings as :meth:`to_dict` writes them, less those that do not change what is trained (``max_minutes``,
        and the LP-FT options unless ``lp_ft``: the run starts from a probe) and those added later at the value
        that trains as before, plus :data:`FINETUNE_VERSION` once bumped. The checkpoint's run hash and a pipeline
        cell's cache key both hash it."""
        left_out = _NOT_IN_IDENTITY if lp_ft else (*_NOT_IN_IDENTITY, *_LP_FT_ONLY)
        settings = {
            k: v
            for k, v in self.to_dict().items()
            if k not in left_out and not (k in _ADDED_LATER and _ADDED_LATER[k] == v)
        }
        return settings if FINETUNE_VERSION == 1 else {**settings, "finetune_version": FINETUNE_VERSION}

    @property
    def label(self) -> str:
        """The phases' names joined by arrows (``head→top2→all``), as a results row shows them."""
        return "→".join(p.label for p in self.phases)
