"""What every benchmark prints beside its figures: the CPU and its ISA, a model's FLOP count, and the machine's
measured peak in a dtype, so that a time can be read as a fraction of what the machine can do; and the timing and
model helpers the benchmarks share."""

from __future__ import annotations

import datetime
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ugatit.checkpoint import save_model
from ugatit.config import ModelConfig
from ugatit.devices import ieee_fp32
from ugatit.fast.precision import ISA_CAPS
from ugatit.models import build_generator

PEAK_CONV_FLOPS = 2 * 256 * 256 * 9 * 64 * 64  # the peak's convolution: 3x3, 256 -> 256 channels, 64 x 64 output
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def isa_kind(flags: set[str]) -> str:
    """The machine kind the README's tables are kept by: what the fastest units for these models are."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "older than AVX2"


def describe_cpu() -> str:
    """The date, the CPU's name, its kind and relevant ISA flags, the torch thread count, and any cap on the ISA that
    the libraries use (`ugatit.fast.precision.ISA_CAPS`): what a figure needs beside it to be compared."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    flags = set(info.get("flags", "").split())
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "?"
    caps = ", ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if name in os.environ)
    capped = f", ISA capped: {caps} (ATen kernels: {torch.backends.cpu.get_cpu_capability()})" if caps else ""
    return (
        f"{datetime.date.today()}, {info.get('model name', '?')}, kind {isa_kind(flags)} ({isa}){capped}, "
        f"{torch.get_num_threads()} threads"
    )


def count_flops(fn, *args) -> int:
    """Floating-point operations of one call (a multiply-add counts 2), by PyTorch's FLOP counter."""
    # Imported here: it brings in fake tensors (tens of MiB), which a benchmark's peak-memory child, importing this
    # module, would otherwise count as the training step's.
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def peak_gflops(dtype: torch.dtype, device: str = "cpu", reps: int = 5) -> float:
    """GFLOP/s of the generators' dominant layer, a 3x3 256-channel convolution on a 64 x 64 map, in `dtype` (a batch
    of 32 on a GPU), in whichever memory layout (NCHW or channels-last) runs it faster here: the highest rate measured
    for the work these models do, taken as the machine's peak. fp32 is IEEE fp32 (no TF32 on a GPU), as ugatit
    computes it."""
    batch = 1 if device == "cpu" else 32  # one map is a few microseconds of work for a GPU: too little to fill it
    rates = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(batch, 256, 66, 66, device=device).to(dtype=dtype, memory_format=layout)
        w = torch.randn(256, 256, 3, 3, device=device).to(dtype=dtype, memory_format=layout)

        def call(x: torch.Tensor = x, w: torch.Tensor = w) -> None:
            F.conv2d(x, w)
            if device != "cpu":
                torch.cuda.synchronize()

        with torch.inference_mode(), ieee_fp32():
            rates.append(batch * PEAK_CONV_FLOPS / _seconds_per_call(call, reps) / 1e9)
    return max(rates)


def peak_int8_gops(reps: int = 5) -> float:
    """The same convolution in ONNX Runtime's int8 kernel (uint8 activations, int8 weights, as `ugatit.quantize`
    writes them) on the CPU, in GOP/s counted like FLOPs: the peak of the int8 path."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scalars = {"xs": np.float32(0.02), "xz": np.uint8(128), "ws": np.float32(0.01), "wz": np.int8(0),
               "ys": np.float32(0.05), "yz": np.uint8(128)}  # fmt: skip
    weights = numpy_helper.from_array(rng.integers(-127, 128, (256, 256, 3, 3), dtype=np.int8), "w")
    inits = [weights] + [numpy_helper.from_array(np.array(v), k) for k, v in scalars.items()]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node], "peak", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 256, 66, 66])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, (1, 256, 66, 66), dtype=np.uint8)
    return PEAK_CONV_FLOPS / _seconds_per_call(lambda: session.run(None, {"x": x}), reps) / 1e9


def medians(works: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each work over `reps` calls after one warm-up call each, the works taking turns so that a
    drift in the machine's speed falls on all of them alike."""
    for work in works.values():
        work()
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(reps):
        for name, work in works.items():
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def random_model(path: Path, config: ModelConfig) -> Path:
    """A model file at `path` holding an A2B generator with random weights (speed does not depend on the weights)."""
    torch.manual_seed(0)
    save_model(path, {"genA2B": build_generator(config).state_dict()}, config)
    return path


def _seconds_per_call(call, reps: int) -> float:
    """Median seconds of one `call`, over `reps` rounds of 10 calls after 2 warm-up rounds."""
    times = []
    for i in range(reps + 2):
        start = time.perf_counter()
        for _ in range(10):
            call()
        if i >= 2:
            times.append((time.perf_counter() - start) / 10)
    return statistics.median(times)
