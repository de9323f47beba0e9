"""Fine-tuning: unfreeze the backbone in phases and train it end to end on a source's splits.

- :mod:`~featx.finetune.config`: phases and :class:`FinetuneConfig`;
- :mod:`~featx.finetune.heads`: the new head, LP-FT's head from a probe, the blocks to unfreeze;
- :mod:`~featx.finetune.data`: training and evaluation images (augmentation, global batches);
- :mod:`~featx.finetune.prepare`: a run's inputs (rows by split, the network with its new head, the setup);
- :mod:`~featx.finetune.state`: a run's state between epochs, and its checkpoint;
- :mod:`~featx.finetune.epochs`: the training loop (phase, epoch, step) and prediction over the ranks;
- :mod:`~featx.finetune.trainer`: the run, :func:`finetune`, as its steps (restore, train, test, write);
- :mod:`~featx.finetune.artifacts`: what a run leaves on disk, and loading it back.
"""

from featx.finetune.artifacts import load_finetuned
from featx.finetune.config import DEFAULT_PHASES, FinetuneConfig, Phase, parse_phases
from featx.finetune.heads import block_names, head_from_logreg
from featx.finetune.trainer import finetune

__all__ = [
    "DEFAULT_PHASES",
    "FinetuneConfig",
    "Phase",
    "block_names",
    "finetune",
    "head_from_logreg",
    "load_finetuned",
    "parse_phases",
]
