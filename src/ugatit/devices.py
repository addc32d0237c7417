"""Which device a `--device` name means ("auto" is the GPU where PyTorch sees one, else the CPU), and that fp32
means fp32 on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run fp32 convolutions and matrix products in full fp32 inside, whatever PyTorch's TF32 settings say outside.

    cuDNN computes fp32 convolutions in TF32 (10-bit mantissas) unless told not to, which the exact path cannot
    take: its parity with the official code holds to 1e-5. ugatit's reduced precision is the fast path's bf16, never
    a silent TF32. The flags are process-wide and only CUDA reads them; the previous values come back on exit.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # PyTorch >= 2.9: mixing in allow_tf32 is an error
        flags = [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        flags = [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    before = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, before, strict=True):
            setattr(owner, name, value)
