"""What the fast path computes in: bf16 where the hardware does bf16 matrix work natively, fp32 elsewhere.

bf16 autocast pays only on hardware with bf16 units: CPUs with AMX or AVX512-BF16, and GPUs with bf16
tensor cores. Elsewhere PyTorch emulates it, and a bf16 step is several times *slower* than fp32 (a 128 px light
step took 100 s in bf16 against 13 s for the official fp32 loop on a 2-core AVX2 AMD EPYC). So `fast_dtype="auto"`
asks the device; the fused norms, fused spectral products, fused Adam and batched passes of the
fast path pay in fp32 as well.
"""

from __future__ import annotations

import torch

from .config import Config


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` runs bf16 convolutions and matrix products on bf16 hardware rather than by emulation."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up defensively
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype that a `Config.fast_dtype` name stands for on `device`: "auto" is bf16 if `native_bf16(device)`,
    else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def compute_dtype(config: Config, device: torch.device | str) -> torch.dtype:
    """The autocast dtype of a run: fp32 on the exact path, `config.fast_dtype` resolved for `device` on the fast."""
    return resolve_dtype(config.fast_dtype, device) if config.fast else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device`, off for fp32 (losses, norm statistics and spectral norms stay fp32 anyway)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def fast_memory_format(device: torch.device | str, dtype: torch.dtype) -> torch.memory_format:
    """The fast path's layout for activations and generator weights: channels_last, except for fp32 on CPU.

    channels_last spares oneDNN (bf16, AMX) and cuDNN their layout conversions. In fp32 on CPU the generators'
    large 3 x 3 convolutions run as Winograd products (`winograd.py`), which read and write NCHW, and oneDNN's
    channels_last fp32 weight gradients are slow at large maps: on a 2-core AVX2 AMD EPYC, forward + backward of
    the upsampling convolutions (256->128 at 64 px, 128->64 at 128 px, batch 2) took 116 and 141 ms against 90 and
    96 ms in NCHW. A 256 px fp32 translation took 564 ms in NCHW against 649 ms in channels_last there.
    """
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return torch.contiguous_format
    return torch.channels_last
