"""Which device a `--device` name means: "auto" is the GPU where PyTorch sees one, else the CPU."""

from __future__ import annotations

import torch

DEVICE_NAMES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device that is not there; the message says which one to use instead."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return device
