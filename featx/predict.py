"""f then g on new images: predict with a classifier on a backbone's features, or with a fine-tuned network.

:func:`predict_images` rebuilds the backbone from the spec a ``featx train`` model recorded (its weights'
checksum verified), extracts through the store cache and classifies; :func:`predict_finetuned` runs a
``featx finetune`` network end to end. Both return one :class:`Prediction` per image, in input order; an
image that cannot be read gets a prediction with ``error`` set instead of failing the batch.
"""

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
from featx.spec import ExtractionSpec
from featx.store.reader import FeatureStore

__all__ = ["Prediction", "predict_finetuned", "predict_images"]


@dataclass
class Prediction:
    """One image's prediction: the top class, its score and the top-k classes (or the error).

    Attributes
    ----------
    path : str
        The image file, resolved to an absolute path.
    label : str, optional
        The predicted class; ``None`` when the image could not be read.
    score : float, optional
        The predicted class's score: a probability for a fine-tuned network or a probabilistic
        classifier, a decision value (margin) otherwise; ``None`` for classifiers that give no scores.
    top_k : list of (str, float)
        The best classes and their scores, best first (empty without scores).
    error : str, optional
        Why the image could not be read.
    score_kind : str, optional
        What ``score`` and ``top_k`` hold: ``"probability"``, ``"margin"`` (an unbounded decision value,
        not comparable across models) or ``None`` (no scores).
    """

    path: str
    label: str | None = None
    score: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    score_kind: str | None = None


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

    Parameters
    ----------
    images : sequence of str or Path
        Image files (a path given twice is predicted once).
    model : TrainedModel
        A classifier from :func:`featx.classify.train` or :func:`featx.classify.load_model`.
    top_k : int, default=5
        How many classes each prediction lists (at most the number of classes).
    device : str, default="auto"
        Where the backbone runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    batch_size : int, default=64
        Images per forward pass of the backbone.
    workers : int, optional
        DataLoader worker processes for decoding; by default one per spare CPU core.
    progress : bool, default=False
        Show the extraction's progress bar.

    Returns
    -------
    list of Prediction
        One per distinct image, in order; ``top_k`` is empty for classifiers without scores.

    Raises
    ------
    ValueError
        ``top_k`` below 1, no images, or a recorded spec this featx cannot read.
    SpecMismatchError
        The rebuilt backbone's weights differ from those the model was trained on.
    """
    from featx.data.sources import from_files
    from featx.extract.api import extract

    if top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    if not images:
        raise ValueError("no images to predict")
    spec = ExtractionSpec.from_dict(model.meta["store_spec"])
    manifest = from_files(images)
    result = extract(
        manifest,
        spec.backbone,
        layers=[model.layer],
        options=spec.options(batch_size=batch_size, workers=workers),  # the recorded spec's, this run's others
        device=device,
        progress=progress,
        max_failures="inf",
        expect_weights_sha256=spec.weights_sha256,
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
            pred = Prediction(image_id, label=model.class_names[int(label)], score_kind=model.score_kind)
            if scores is not None:
                pred.top_k = _ranked(scores[row], model.class_names, top_k)
                pred.score = float(scores[row, int(label)])
            by_id[image_id] = pred
    return [by_id[i] for i in manifest.ids]


def predict_finetuned(
    images: Sequence[str | Path], out_dir: str | Path, *, top_k: int = 5, device: str = "auto", batch_size: int = 64
) -> list[Prediction]:
    """Classify image files with a fine-tuned network (``featx finetune --out`` folder), by softmax probabilities.

    Parameters
    ----------
    images : sequence of str or Path
        Image files; each is preprocessed as the network's weights expect (resize, centre crop).
    out_dir : str or Path
        The folder ``featx finetune`` wrote (``finetune.json`` and ``model.safetensors``).
    top_k : int, default=5
        How many classes each prediction lists (at most the number of classes).
    device : str, default="auto"
        ``auto`` (the first CUDA GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    batch_size : int, default=64
        Images per forward pass.

    Returns
    -------
    list of Prediction
        One per image, in order; ``score`` and ``top_k`` hold softmax probabilities. Unreadable images
        get ``error`` set.

    Raises
    ------
    ValueError
        ``top_k`` below 1, or a bad ``device``.
    FileNotFoundError
        ``out_dir`` is not a ``featx finetune`` folder.
    """
    from featx.exceptions import ImageDecodeError

    if top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    model, meta = load_finetuned(out_dir)
    dev = resolve_device(device)
    model = model.to(dev)
    pre = model.preprocessing
    names = meta["class_names"]
    results: list[Prediction] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        with torch.inference_mode():
            probs = torch.softmax(model(torch.stack([t for _, t in batch]).to(dev)).float(), dim=1).cpu().numpy()
        for (i, _), p in zip(batch, probs, strict=True):
            results[i].top_k = _ranked(p, names, top_k)
            results[i].label, results[i].score = results[i].top_k[0]
        batch.clear()

    for path in images:
        resolved = str(Path(path).expanduser().resolve())
        results.append(Prediction(resolved, score_kind="probability"))
        try:
            batch.append((len(results) - 1, load_for_model(resolved, pre)))
        except ImageDecodeError as exc:
            results[-1].error = str(exc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return results


def _ranked(scores: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` best classes (at most all of them) and their scores, best first."""
    order = np.argsort(-scores)[: min(k, len(names))]
    return [(names[int(c)], float(scores[c])) for c in order]
