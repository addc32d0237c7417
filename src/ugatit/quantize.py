"""Reduced precision for deployment: `quantize_onnx` turns an fp32 file of `export_onnx` into an int8 one.

Why int8. ONNX Runtime's CPU kernels run a float32 graph near the machine's fp32 peak, which PyTorch's bf16 fast path
beats. Its int8 convolutions (activations uint8, weights int8: "U8S8") use the CPU's int8 dot-product instructions
(VNNI, AMX) where it has them and can outrun both; the other pairing (S8S8, the quantizer's default) is many times
slower on x86, so it is never used.

What is quantized. Static quantization with ranges calibrated on images of the generator's input domain, written in
the QDQ format (QuantizeLinear / DequantizeLinear pairs around float ops, which ONNX Runtime fuses into int8 kernels
and other runtimes read too). The convolutions (weights per output channel), the reflection pads and the nearest
upsampling run in int8. The normalisations, the MLP and the attention stay in fp32: their statistics are what makes
a generator sensitive to rounding, and they hold little of the arithmetic. So does the RGB output convolution, whose
three output channels ONNX Runtime's int8 kernel handles at a fraction of its fp32 speed.

Calibration keeps a moving average of each activation's min and max over the images (ONNX Runtime's MinMax with
averaging): it discounts the rare extremes that a plain min and max let stretch the range, and on a trained
horse2zebra model it came within a fraction of a dB of percentile ranges, which hold every tensor of every image in
memory (many GB at 256 px).

What it costs. `quantize_onnx` measures the int8 file against the fp32 one on held-out images of the same folder
and returns the figures (`QuantizeReport`); docs/performance.md has them for a trained model on real photos.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .config import ModelConfig, model_config_from_dict
from .data import BadImageError, eval_transform, list_images, load_rgb, to_uint8
from .export import FORMAT, IMAGE, INPUT, ExportError
from .extras import require

PRECISION_KEY = "precision"  # metadata key: "int8" in a quantized file, absent in an fp32 one
QUANTIZED_OPS = ("Conv", "Pad", "Resize")
CALIBRATION_IMAGES = 32  # ranges settle after a few dozen images; each one costs a full forward pass
HELD_OUT_IMAGES = 8
NARROW = 4  # output channels below which a convolution stays in fp32: the RGB output layer


@dataclass(frozen=True)
class QuantizeReport:
    """How far the int8 file's 8-bit images are from the fp32 file's on `compared` held-out images (or on the
    calibration images, when the folder had no others: `held_out` False)."""

    calibration_images: int
    skipped: int
    compared: int
    held_out: bool
    max_abs: int  # in 8-bit levels
    mean_abs: float  # in 8-bit levels
    psnr_db: float

    def describe(self) -> str:
        which = "held-out" if self.held_out else "calibration (the folder had no others)"
        skipped = f", {self.skipped} unreadable file(s) skipped" if self.skipped else ""
        return (
            f"calibrated on {self.calibration_images} image(s){skipped}; int8 against fp32 on {self.compared} "
            f"{which} image(s): PSNR {self.psnr_db:.1f} dB, mean |diff| {self.mean_abs:.2f}, "
            f"max |diff| {self.max_abs} (8-bit levels)"
        )


def _spread(items: Sequence[Path], count: int) -> list[Path]:
    """`count` items evenly spaced over `items` (all of them if fewer): the same choice on every run."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _inputs(paths: Sequence[Path], config: ModelConfig, uint8: bool) -> tuple[list[np.ndarray], int]:
    """The model inputs (1 x 3 x H x W, as the file takes them) of the images among `paths` that decode, each
    transformed as the translators do, and how many did not decode. Only the small inputs are kept: a folder of
    full-size photos never sits in memory."""
    inputs = []
    for path in paths:
        try:
            x = eval_transform(load_rgb(path), config.img_size, config.keep_aspect)[None]
        except BadImageError:
            continue
        inputs.append(to_uint8(x).numpy() if uint8 else x.numpy())
    return inputs, len(paths) - len(inputs)


class _Batches:
    """Model inputs one image at a time, as onnxruntime's calibration reader protocol wants them (`get_next`,
    then None)."""

    def __init__(self, arrays: Iterator[np.ndarray]) -> None:
        self._arrays = arrays

    def get_next(self) -> dict[str, np.ndarray] | None:
        array = next(self._arrays, None)
        return None if array is None else {INPUT: array}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _unshare_initializers(proto) -> None:
    """Give every consumer of a shared weight its own copy, in place. The exporter stores equal tensors once and
    feeds the other users through Identity nodes (the zero biases of a TF-architecture generator, for one); a bias
    that is not its convolution's own initializer cannot be quantized, and the convolution then stays in fp32."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    for node in list(proto.graph.node):
        if node.op_type == "Identity" and node.input[0] in initializers:
            value = numpy_helper.to_array(initializers[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            proto.graph.node.remove(node)


def _narrow_convolutions(proto) -> list[str]:
    """The convolutions with fewer than NARROW output channels (the RGB output layer), which stay in fp32: ONNX
    Runtime's int8 kernel runs them at a small fraction of its fp32 speed."""
    shapes = {tensor.name: tensor.dims for tensor in proto.graph.initializer}
    return [
        node.name for node in proto.graph.node
        if node.op_type == "Conv" and node.input[1] in shapes and shapes[node.input[1]][0] < NARROW
    ]  # fmt: skip


def _metadata(proto) -> dict[str, str]:
    return {prop.key: prop.value for prop in proto.metadata_props}


def quantize_onnx(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: str | os.PathLike,
    images: int = CALIBRATION_IMAGES,
) -> QuantizeReport:
    """Write an int8 copy of the fp32 ONNX file `source` at `out_path` (atomically), calibrated on up to `images`
    images of the folder `calibration` (the generator's input domain: trainA or testA for an A2B file), spread over
    it; returns its error against `source` on other images of the folder."""
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such ONNX file")
    proto = onnx.load(str(source))
    meta = _metadata(proto)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ExportError(f"{source}: not a ugatit ONNX export; export it with `ugatit export --format onnx`")
    if PRECISION_KEY in meta:
        raise ExportError(f"{source} is already {meta[PRECISION_KEY]}; quantize the fp32 export instead")
    config = model_config_from_dict(json.loads(meta["config"]), str(source))
    uint8 = proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    paths = list_images(calibration)
    chosen = _spread(paths, images)
    calibrating = set(chosen)
    rest = [p for p in paths if p not in calibrating]
    calibration_set, skipped = _inputs(chosen, config, uint8)
    if not calibration_set:
        raise ExportError(f"{calibration}: no readable images to calibrate on; point --calibration at a folder of "
                          "the generator's input images (e.g. trainA for A2B)")  # fmt: skip
    held_out, skipped_held_out = _inputs(_spread(rest, HELD_OUT_IMAGES), config, uint8)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        _unshare_initializers(proto)
        onnx.save(proto, str(fp32))
        with _quiet_root_logger():  # onnxruntime logs generic pre-processing advice on the root logger
            quantize_static(
                str(fp32), str(quantized), _Batches(iter(calibration_set)),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=_narrow_convolutions(proto),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibMovingAverage": True},
            )  # fmt: skip
        proto = onnx.load(str(quantized))
        report = _compare(
            ort, source, quantized, held_out or calibration_set, len(calibration_set),
            skipped + skipped_held_out, bool(held_out),
        )  # fmt: skip
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=PRECISION_KEY, value="int8")
    proto.metadata_props.add(
        key="quantization",
        value=f"static, QDQ, uint8 activations, int8 weights per channel, {'/'.join(QUANTIZED_OPS)} in int8; "
        f"moving-average MinMax ranges from {len(calibration_set)} image(s); {report.describe()}",
    )
    onnx.checker.check_model(proto)
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: onnx.save(proto, str(tmp)))
    return report


def _compare(
    ort, fp32: Path, int8: Path, inputs: list[np.ndarray], calibrated: int, skipped: int, held_out: bool
) -> QuantizeReport:
    """Both files on each input, their outputs as 8-bit images, and the differences summed up."""
    sessions = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in (fp32, int8)]
    diffs = []
    for x in inputs:
        a, b = (torch.from_numpy(session.run([IMAGE], {INPUT: x})[0]) for session in sessions)
        if a.dtype != torch.uint8:
            a, b = to_uint8(a), to_uint8(b)
        diffs.append((a.to(torch.int16) - b.to(torch.int16)).abs())
    diff = torch.cat([d.flatten() for d in diffs]).double()
    mse = float((diff**2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    return QuantizeReport(calibrated, skipped, len(diffs), held_out, int(diff.max()), float(diff.mean()), psnr)
