"""Where and in what precision the networks run: device resolution, autocast modes, memory layout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from featx._runtime.env import temporary, temporary_attr
from featx.spec import AMP_MODES, check_option

__all__ = ["autocast", "autocast_dtype", "channels_last_pays", "exact_float32", "resolve_amp", "resolve_device"]

# The one map from a resolved amp mode (as a spec records it) to the dtype autocast runs in.
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast mode to record and run: ``auto`` → bf16 (fp16 without bf16 support) on CUDA, none elsewhere.

    Raises
    ------
    UnknownNameError
        ``amp`` is not ``auto``, ``bf16``, ``fp16`` or ``none``.
    """
    if amp == "auto":
        if device.type != "cuda":
            return "none"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return check_option("amp", amp)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs in for a resolved amp mode; ``None`` for ``none`` (no autocast)."""
    return _AUTOCAST_DTYPES[check_option("amp", amp, AMP_MODES)]


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """``torch.autocast`` on ``device`` in a resolved amp mode (disabled for ``none``)."""
    dtype = autocast_dtype(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def exact_float32(device: torch.device, amp: str = "none") -> contextlib.AbstractContextManager[None]:
    """Within the block, float32 on a CUDA ``device`` means float32: no TF32 matmuls or convolutions.

    So a GPU store made without autocast matches the CPU's numbers. PyTorch's own settings (the float32
    matmul precision, cuDNN's TF32 switch) are put back on leaving. A no-op on other devices and when ``amp``
    is an autocast mode, where float32 is not asked for.
    """
    if device.type != "cuda" or amp != "none":
        return contextlib.nullcontext()
    return _no_tf32()


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    # The matmul precision, not matmul.allow_tf32: restoring a boolean would turn "medium" into "high".
    matmuls = temporary(
        "torch.float32_matmul_precision",
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
        "highest",
    )
    with matmuls, temporary_attr(torch.backends.cudnn, "allow_tf32", False):
        yield
