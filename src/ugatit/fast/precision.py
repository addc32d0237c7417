"""What the fast path computes in, and in which memory layout: bf16 where the hardware does bf16 matrix work
natively, fp32 elsewhere.

bf16 autocast pays only on hardware with bf16 units: CPUs with AMX or AVX512-BF16, and GPUs with bf16 tensor cores.
Elsewhere PyTorch emulates it, and a bf16 step is several times slower than fp32 (docs/performance.md, "What the
fast path does"). So `fast_dtype="auto"` asks the device.
"""

from __future__ import annotations

import contextlib
import os

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` runs bf16 convolutions and matrix products on bf16 hardware rather than by emulation."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up defensively
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes) and not _onednn_capped_below_bf16()
    return False


# The environment variables that hold a library below the CPU's own instruction set: oneDNN's (and its old name),
# PyTorch's own kernels' and MKL's. Set to AVX2 together, an AVX-512 CPU runs the code paths of an AVX2 one.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")

# oneDNN's ISA levels below its first with bf16 dot products (AVX512_CORE_BF16)
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _onednn_capped_below_bf16() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its old name) keeps oneDNN off the bf16 instructions: the CPU has them, but
    the convolutions would emulate bf16 as on a CPU without."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return cap.upper() in _ISAS_WITHOUT_BF16


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype that a fast dtype name ("auto", "bfloat16", "float32") stands for on `device`: "auto" is bf16 if
    `native_bf16(device)`, else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def autocast(device: torch.device | str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device`, off for fp32 (losses, norm statistics and spectral norms stay fp32 anyway)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for tensor's device: sigma, the power iteration, weight-bound products and the fused norms keep
    their own precision, and padding its input's."""
    device = tensor.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def memory_format(device: torch.device | str, dtype: torch.dtype) -> torch.memory_format:
    """The fast path's layout for activations and generator weights: channels_last, except for fp32 on CPU.

    channels_last spares oneDNN (bf16, AMX) and cuDNN their layout conversions. In fp32 on CPU the generators'
    large 3 x 3 convolutions run as Winograd products (`winograd.py`), which read and write NCHW, and oneDNN's
    channels_last fp32 kernels were slower there, in training and in translation (docs/performance.md).
    """
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return torch.contiguous_format
    return torch.channels_last


def layout_of(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format a tensor is laid out in: channels_last where it is that and not plain contiguous."""
    channels_last = not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format
