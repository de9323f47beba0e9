"""TODO docstring"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featx._runtime.device import resolve_device
from featx.classify.model import TrainedModel, check_compatible
from featx.data.imageio import load_for_model
from featx.finetune.artifacts import load_finetuned
from featx.spec import DEFAULT_MAX_PIXELS, Preprocessing
from featx.store.reader import FeatureStore

__all__ = ["Prediction", "predict_finetuned", "predict_images"]


@dataclass
class Prediction:
    """One image's prediction: the top class, its score and the top-k classes (or the error)."""

    path: str
    label: str | None = None
    score: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def predict_images(
    images: Sequence[str | Path],
    model: TrainedModel,
    *,
    top_k: int = 5,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = False,
) -> list[Prediction]:
    """Run f then g on image files: extract with the model's recorded spec, then classify.

    The backbone is rebuilt from the spec the model was trained on (and its weight checksum verified);
    features go through the store cache, so predicting the same files again is instant. Images that
    cannot be read get a :class:`Prediction` with ``error`` set; the others are still predicted.
    """
    from featx.data.sources import from_files
    from featx.extract.api import extract

    if top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    if not images:
        raise ValueError("no images to predict")
    spec = model.meta["store_spec"]
    manifest = from_files(images)
    result = extract(
        manifest,
        spec["backbone"],
        layers=[model.layer],
        pool=spec["pool"],
        dtype=spec["dtype"],
        amp=spec["amp"],
        tta=spec["tta"],
        max_pixels=spec.get("max_pixels", DEFAULT_MAX_PIXELS),
        decode=spec.get("decode", "exact"),
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        max_failures="inf",
        expect_weights_sha256=spec["weights_sha256"],
    )
    with FeatureStore(result.path) as store:
        check_compatible(model, store)
        X = store.features(model.layer, dtype=np.float32)
        ids = store.ids()
        failures = {f.id: f.reason for f in store.failures}
    by_id: dict[str, Prediction] = {i: Prediction(i, error=reason) for i, reason in failures.items()}
    if len(ids):
        scores = model.scores(X)
        predicted = model.predict(X)
        for row, (image_id, label) in enumerate(zip(ids, predicted, strict=True)):
            pred = Prediction(image_id, label=model.class_names[int(label)])
            if scores is not None:
                order = np.argsort(-scores[row])[: min(top_k, len(model.class_names))]
                pred.top_k = [(model.class_names[int(c)], float(scores[row, c])) for c in order]
                pred.score = float(scores[row, int(label)])
            by_id[image_id] = pred
    return [by_id[i] for i in manifest.ids]


def predict_finetuned(
    images: Sequence[str | Path], out_dir: str | Path, *, top_k: int = 5, device: str = "auto", batch_size: int = 64
) -> list:
    """Classify image files with a fine-tuned network (softmax scores); unreadable files get an error."""
    from featx.exceptions import ImageDecodeError

    pass

    model, meta = load_finetuned(out_dir)
    dev = resolve_device(device)
    model = model.to(dev)
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    names = meta["class_names"]
    results: list[Prediction] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        with torch.inference_mode():
            probs = torch.softmax(model(torch.stack([t for _, t in batch]).to(dev)).float(), dim=1).cpu().numpy()
        for (i, _), p in zip(batch, probs, strict=True):
            order = np.argsort(-p)[: min(top_k, len(names))]
            results[i].label = names[int(order[0])]
            results[i].score = float(p[order[0]])
            results[i].top_k = [(names[int(c)], float(p[c])) for c in order]
        batch.clear()

    for path in images:
        resolved = str(Path(path).expanduser().resolve())
        results.append(Prediction(resolved))
        try:
            batch.append((len(results) - 1, load_for_model(resolved, pre)))
        except ImageDecodeError as exc:
            results[-1].error = str(exc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return results
