"""What every benchmark prints beside its figures: the CPU and its ISA, a model's FLOP count, and the machine's
measured peak in a dtype, so that a time can be read as a fraction of what the machine can do."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def describe_cpu() -> str:
    """The CPU's name, its relevant ISA flags and the torch thread count."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    flags = set(info.get("flags", "").split())
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "?"
    return f"{info.get('model name', '?')} ({isa}), {torch.get_num_threads()} threads"


def count_flops(fn, *args) -> int:
    """Floating-point operations of one call (a multiply-add counts 2), by PyTorch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def peak_gflops(dtype: torch.dtype, device: str = "cpu", reps: int = 5) -> float:
    """GFLOP/s of the generators' dominant layer, a 3x3 256-channel convolution on a 64 x 64 map, channels-last, in
    `dtype`: the highest rate measured here for the work these models do, taken as the machine's peak."""
    x = torch.randn(1, 256, 66, 66, device=device).to(dtype=dtype, memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype=dtype, memory_format=torch.channels_last)
    flops = 2 * 256 * 256 * 9 * 64 * 64
    times = []
    with torch.inference_mode():
        for i in range(reps + 2):
            start = time.perf_counter()
            for _ in range(10):
                F.conv2d(x, w)
            if device != "cpu":
                torch.cuda.synchronize()
            if i >= 2:  # warm-up first
                times.append((time.perf_counter() - start) / 10)
    return flops / statistics.median(times) / 1e9
