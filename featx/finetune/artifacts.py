"""TODO docstring"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featx.backbones.features import Backbone
from featx.backbones.loading import load_backbone
from featx.finetune.config import FinetuneConfig
from featx.finetune.heads import _build_head, _Classifier, _set_module
from featx.spec import Preprocessing, canonical_json

__all__ = ["CHECKPOINT", "FINETUNE_META", "WEIGHTS", "load_finetuned"]


CHECKPOINT = "checkpoint.pt"


FINETUNE_META = "finetune.json"


WEIGHTS = "model.safetensors"


# ------------------------------------------------------------------------------------------- run
def _config_hash(config: FinetuneConfig, backbone: Backbone, manifest_fp: str, init_head: str | None) -> str:
    payload = canonical_json(
        {
            "config": config.to_dict(),
            "backbone": backbone.name,
            "weights": backbone.weights_sha256,
            "manifest": manifest_fp,
            "init_head": init_head,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_finetuned(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned network (eval mode, CPU) and its metadata from a ``featx finetune`` folder."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta_path = out / FINETUNE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out} holds no {FINETUNE_META}; is it a `featx finetune --out` folder?")
    meta = json.loads(meta_path.read_text())
    net = load_backbone(meta["backbone"])
    head = net.model.get_submodule(meta["head"]["name"])
    _set_module(
        net.model,
        meta["head"]["name"],
        _build_head(head.in_features, len(meta["class_names"]), meta["head"]["hidden"], meta["head"]["dropout"]),
    )
    net.model.load_state_dict(load_file(str(out / WEIGHTS)))
    net.model.eval()
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    return _Classifier(net.model, pre).eval(), meta
