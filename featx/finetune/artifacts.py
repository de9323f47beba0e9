"""What a fine-tuning run leaves in its folder, written atomically, and loading it back.

``checkpoint.pt`` (the run state after every epoch, see :mod:`featx.finetune.state`; once the run is finished,
only its record, without weights), ``model.safetensors``
(the best epoch's weights), ``finetune.json`` (how to rebuild the network: :func:`load_finetuned`) and
``results.json`` (:class:`featx.results.FinetuneResults`). Every one goes through
:func:`featx._runtime.io.atomic_write`, so a run killed at any moment leaves the previous file or the new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from featx._runtime.io import atomic_write
from featx.backbones.features import Backbone
from featx.backbones.loading import load_backbone
from featx.backbones.names import FINETUNE_META, FINETUNE_WEIGHTS
from featx.exceptions import DamagedFileError
from featx.finetune.config import FinetuneConfig
from featx.finetune.heads import ClassifierNet, build_head, set_module
from featx.spec import Preprocessing, canonical_json

__all__ = ["CHECKPOINT", "FINETUNE_META", "WEIGHTS", "load_finetuned", "read_finetune_meta"]


CHECKPOINT = "checkpoint.pt"


# A fine-tune folder is also a backbone name (featx.backbones.names reads it), so its file names live there.
WEIGHTS = FINETUNE_WEIGHTS


# ------------------------------------------------------------------------------------------- run
def config_hash(
    config: FinetuneConfig, backbone: Backbone, manifest_fp: str, init_head: str | None, refit: str = "train"
) -> str:
    payload = canonical_json(
        {
            "config": config.identity(lp_ft=init_head is not None),
            "backbone": backbone.name,
            "weights": backbone.weights_sha256,
            "manifest": manifest_fp,
            "init_head": init_head,
        }
        | ({"refit": refit} if refit != "train" else {})  # a default run keeps the hash of a featx before refit
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def save_weights(path: Path, model: nn.Module) -> None:
    """The network's state dict as safetensors (loadable as ``file:ARCH=PATH`` for a linear head)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write(path, lambda fh: fh.write(data))


def save_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_finetune_meta(out_dir: str | Path) -> dict[str, Any]:
    """``finetune.json`` of a ``featx finetune`` folder: backbone, architecture, classes, head, config, best epoch.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no ``finetune.json``.
    DamagedFileError
        ``finetune.json`` is not JSON, or lacks what rebuilding the network needs (a ``ValueError``).
    """
    meta_path = Path(out_dir) / FINETUNE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no {FINETUNE_META}; is it a `featx finetune --out` folder?")
    return _read_meta(meta_path)


def load_finetuned(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned network and its metadata from a ``featx finetune`` folder.

    Parameters
    ----------
    out_dir : str or Path
        The ``--out`` folder of ``featx finetune`` (it holds ``finetune.json`` and ``model.safetensors``).

    Returns
    -------
    model : torch.nn.Module
        The network with its new head, in eval mode on the CPU; it takes uint8 pixels (``[N, 3, H, W]``,
        preprocessed as ``model.preprocessing`` says) and returns logits.
    meta : dict
        ``finetune.json``: backbone, class names, preprocessing, head, config, best epoch.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no ``finetune.json``.
    DamagedFileError
        Its ``finetune.json`` is not JSON, or lacks what rebuilding the network needs.
    """
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta = read_finetune_meta(out)
    net = load_backbone(meta["backbone"])
    head = net.model.get_submodule(meta["head"]["name"])
    set_module(
        net.model,
        meta["head"]["name"],
        build_head(head.in_features, len(meta["class_names"]), meta["head"]["hidden"], meta["head"]["dropout"]),
    )
    net.model.load_state_dict(load_file(str(out / WEIGHTS)))
    net.model.eval()
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    return ClassifierNet(net.model, pre).eval(), meta


def _read_meta(path: Path) -> dict[str, Any]:
    """``finetune.json``, checked for what :func:`load_finetuned` reads, or a :class:`DamagedFileError` naming it."""
    fix = "re-run the `featx finetune` that made the folder (a finished run is only tested again and rewrites it)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DamagedFileError(f"{path} is not valid JSON ({exc}); {fix}") from None
    head = meta.get("head") if isinstance(meta, dict) else None
    missing = [
        k for k in ("backbone", "class_names", "preprocessing", "head") if not isinstance(meta, dict) or k not in meta
    ]
    missing += [f"head.{k}" for k in ("name", "hidden", "dropout") if isinstance(head, dict) and k not in head]
    if missing or not isinstance(head, dict):
        raise DamagedFileError(
            f"{path} is not a featx fine-tuning record: it lacks {', '.join(missing) or 'head'}; {fix}"
        )
    return meta
