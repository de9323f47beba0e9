"""LP-FT's gradient-norm cap: ``clip_grad="auto"`` clips a run whose head starts from a probe, and no other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

from featx.finetune import LPFT_CLIP_GRAD, FinetuneConfig, finetune


@pytest.fixture
def folder(colour_folder) -> Path:
    return colour_folder


def test_auto_resolves_by_the_head_and_a_number_stays():
    auto = FinetuneConfig()
    assert auto.clip_grad == "auto"
    assert auto.for_head(from_probe=True).clip_grad == LPFT_CLIP_GRAD
    assert auto.for_head(from_probe=False).clip_grad == 0.0
    assert FinetuneConfig(clip_grad=5.0).for_head(from_probe=True).clip_grad == 5.0
    assert FinetuneConfig(clip_grad=0.0).for_head(from_probe=True).clip_grad == 0.0  # a user's "off" stays off


def test_a_fresh_head_run_keeps_the_identity_it_had_before_auto():
    # clip 0 was the default until auto: a fresh-head run (checkpoint, cached cell) keeps its hash.
    assert FinetuneConfig().for_head(from_probe=False).identity() == FinetuneConfig(clip_grad=0.0).identity()
    assert FinetuneConfig().for_head(from_probe=True).identity() != FinetuneConfig(clip_grad=0.0).identity()
    with pytest.raises(ValueError, match="for_head"):
        FinetuneConfig().identity()  # unresolved: what trains depends on the head


def _clip_calls(monkeypatch) -> list[float]:
    calls: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    return calls


def test_lp_ft_clips_its_gradients_and_a_fresh_head_does_not(folder, tmp_path, monkeypatch):
    from featx.classify import ClassifierConfig, train
    from featx.extract import extract

    store = extract(folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False).path
    train(store, ClassifierConfig(classifier="logreg", value=1.0), out_dir=tmp_path / "lr")
    config = FinetuneConfig(phases="all:1:1e-3", batch_size=8)
    calls = _clip_calls(monkeypatch)

    plain = finetune(folder, TINY, config, tmp_path / "ft", workers=0, progress=False)
    assert calls == [] and plain["finetune"]["clip_grad"] == 0.0

    lpft = finetune(
        folder, TINY, config, tmp_path / "lpft", init_head=tmp_path / "lr" / "model.skops", workers=0, progress=False
    )
    assert calls and set(calls) == {LPFT_CLIP_GRAD}
    assert lpft["finetune"]["clip_grad"] == LPFT_CLIP_GRAD  # the results record the number, not "auto"
