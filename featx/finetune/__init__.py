"""Fine-tuning: unfreeze the backbone in phases and train it end to end on a source's splits.

- :mod:`~featx.finetune.config`: phases and :class:`FinetuneConfig`;
- :mod:`~featx.finetune.heads`: the new head, LP-FT's head from a probe, the blocks to unfreeze;
- :mod:`~featx.finetune.data`: training and evaluation images (augmentation, global batches);
- :mod:`~featx.finetune.prepare`: a run's inputs (rows by split, the network with its new head, the setup);
- :mod:`~featx.finetune.state`: a run's state between epochs, and its checkpoint;
- :mod:`~featx.finetune.epochs`: the training loop (epoch 0, phase, epoch, step) and prediction over the ranks;
- :mod:`~featx.finetune.sweep`: the base learning rate chosen on val (a short run per candidate rate);
- :mod:`~featx.finetune.refit`: under ``refit="train+val"``, the chosen rate and epochs trained again on train+val;
- :mod:`~featx.finetune.trainer`: the run, :func:`finetune`, as its steps (restore, train, test, write);
- :mod:`~featx.finetune.artifacts`: what a run leaves on disk, and loading it back.
"""

import importlib

from featx.finetune.config import (
    DEFAULT_LAYER_DECAY,
    DEFAULT_LR_CANDIDATES,
    DEFAULT_PHASES,
    DEFAULT_PROBE_SCALE_FLOOR,
    FinetuneConfig,
    Phase,
    parse_phases,
)

# The rest imports torch: loaded on first use, so `featx --help` and the CLI's defaults stay fast.
_LAZY = {
    "block_names": "featx.finetune.heads",
    "finetune": "featx.finetune.trainer",
    "head_from_logreg": "featx.finetune.heads",
    "load_finetuned": "featx.finetune.artifacts",
}

__all__ = [
    "DEFAULT_LAYER_DECAY",
    "DEFAULT_LR_CANDIDATES",
    "DEFAULT_PHASES",
    "DEFAULT_PROBE_SCALE_FLOOR",
    "FinetuneConfig",
    "Phase",
    "block_names",
    "finetune",
    "head_from_logreg",
    "load_finetuned",
    "parse_phases",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx.finetune' has no attribute {name!r}")
