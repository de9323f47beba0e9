"""TODO docstring"""

from __future__ import annotations

import torch

from featx.exceptions import unknown
from featx.spec import (
    AMP_MODES,
)

__all__ = ["channels_last_pays", "resolve_device"]


def channels_last_pays(device: torch.device) -> bool:
    """Whether to run convolutions in ``channels_last`` (NHWC) on ``device``: faster on CUDA and on the CPU
    (oneDNN), for inference and training alike (benchmarks/RESULTS.md); left alone elsewhere (MPS)."""
    return device.type in ("cuda", "cpu")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU; explicit devices are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    return dev


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        if device.type != "cuda":
            return "none"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in AMP_MODES:
        raise unknown("amp mode", amp, (*AMP_MODES, "auto"), "Use auto, bf16, fp16 or none.")
    return amp
