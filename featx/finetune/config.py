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

from featx.spec import canonical_json

__all__ = ["DEFAULT_PHASES", "FinetuneConfig", "Phase", "parse_phases"]


#: The classic recipe: the head alone, then the top two blocks, then everything, each at a tenth of the rate.
DEFAULT_PHASES = "head:3:1e-3,top2:5:1e-4,all:5:1e-5"


_PHASE_RE = re.compile(r"^(head|all|top(\d+)):(\d+):([0-9.eE+-]+)$")


# ------------------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class Phase:
    """One training phase: what is trainable, for how many epochs, at which peak learning rate.

    ``freeze`` is ``head`` (only the new head trains), ``topK`` (the last K backbone blocks and the head)
    or ``all`` (everything trains).
    """

    freeze: str
    epochs: int
    lr: float

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


def parse_phases(spec: str | Path) -> list[Phase]:
    """``"head:3:1e-3,top2:5:1e-4,all:5:1e-5"`` (FREEZE:EPOCHS:LR, comma-separated) or a TOML file.

    A TOML file holds ``[[phase]]`` tables with ``freeze``, ``epochs`` and ``lr``.
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
            phases.append(Phase(str(table["freeze"]), int(table["epochs"]), float(table["lr"])))
        return phases
    phases = []
    for part in (p.strip() for p in text.split(",")):
        m = _PHASE_RE.match(part)
        if not m:
            raise ValueError(
                f"phase {part!r} is not FREEZE:EPOCHS:LR (FREEZE = head, topK or all), "
                'e.g. "head:3:1e-3,top2:5:1e-4,all:5:1e-5"'
            )
        try:
            lr = float(m.group(4))
        except ValueError:
            raise ValueError(f"phase {part!r}: {m.group(4)!r} is not a learning rate") from None
        phases.append(Phase(m.group(1), int(m.group(3)), lr))
    return phases


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (its hash guards resuming).

    Parameters
    ----------
    phases : tuple of Phase
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
    warmup : float, default=0.1
        Share of each phase's steps spent warming up linearly.
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
    seed : int, default=0
    update_bn_stats : bool, default=False
        Let unfrozen BatchNorm layers update their running statistics. Off by default, as the Keras
        transfer-learning guide advises: on small or shifted data, batch statistics drift and wreck the
        pretrained features (LP-FT on digits fell from 0.96 to 0.28 with them on).
    """

    phases: tuple[Phase, ...]
    batch_size: int = 32
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    clip_grad: float = 0.0
    backbone_lr_mult: float = 1.0
    warmup: float = 0.1
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip: bool = True
    patience: int | None = None
    metric: str = "val_accuracy"
    seed: int = 0
    update_bn_stats: bool = False

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("fine-tuning needs at least one phase")
        checks = [
            (self.batch_size >= 1, f"batch size must be positive, got {self.batch_size}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer {self.optimizer!r}: use sgd or adamw"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (self.clip_grad >= 0, "gradient clipping must be >= 0 (0 = off)"),
            (self.backbone_lr_mult > 0, "the backbone learning-rate multiplier must be positive"),
            (0 <= self.warmup < 1, "warm-up must be a share of each phase's steps, in [0, 1)"),
            (all(h >= 1 for h in self.hidden), "hidden sizes must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop scale must satisfy 0 < min <= max <= 1"),
            (isinstance(self.flip, bool), f"flip must be true or false, got {self.flip!r}"),
            (self.patience is None or self.patience >= 1, "patience must be at least 1 epoch"),
            (self.metric in ("val_accuracy", "val_loss"), f"metric {self.metric!r}: use val_accuracy or val_loss"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (phases as dicts, tuples as lists), as results and hashes record it."""
        d = dataclasses.asdict(self)
        d["phases"] = [dataclasses.asdict(p) for p in self.phases]
        return json.loads(canonical_json(d))

    @property
    def label(self) -> str:
        """The phases' names joined by arrows (``head→top2→all``), as a results row shows them."""
        return "→".join(p.label for p in self.phases)
