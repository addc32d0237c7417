"""Reduced precision for deployment: `quantize_onnx` turns an fp32 file of `export_onnx` into an int8 one.

Why int8. ONNX Runtime's CPU kernels run a float32 graph near the machine's fp32 peak, which PyTorch's bf16 fast path
beats. Its int8 convolutions (activations uint8, weights int8: "U8S8") use the CPU's int8 dot-product instructions
(VNNI, AMX) where it has them and can outrun both; the other pairing (S8S8, the quantizer's default) is many times
slower on x86, so it is never used.

Why 7-bit weights. On x86 CPUs without VNNI (AVX2, and AVX-512 without VNNI) ONNX Runtime's U8S8 kernels add pairs
of uint8 x int8 products in 16 bits with saturation, and two products of 255 x 127 overflow it: such a CPU would
silently clip some sums. With weights in [-64, 64] (the quantizer's `reduce_range`) a pair is at most
2 x 255 x 64 = 32640, which fits, so one int8 file is right on every x86 CPU (tests/test_quantize.py runs one on an
emulated AVX2 CPU); what the lost bit costs in error and speed is measured in docs/performance.md.

What is quantized. Static quantization with ranges calibrated on images of the generator's input domain, written in
the QDQ format (QuantizeLinear / DequantizeLinear pairs around float ops, which ONNX Runtime fuses into int8 kernels
and other runtimes read too). The convolutions (weights per output channel), the reflection pads and the nearest
upsampling run in int8. The normalisations, the MLP and the attention stay in fp32: their statistics are what makes
a generator sensitive to rounding, and they hold little of the arithmetic. So does the RGB output convolution, whose
three output channels ONNX Runtime's int8 kernel handles at a fraction of its fp32 speed.

Two rewrites of the quantizer's graph then spare ONNX Runtime full passes over the feature maps, computing the same
numbers: the pads and upsampling take the quantized maps directly (`_data_movement_in_uint8`), and the RGB layer
runs on 2 x 2 blocks of its input (`_narrow_convolutions_on_blocks`).

Calibration keeps a moving average of each activation's min and max over the images (ONNX Runtime's MinMax with
averaging): it discounts the rare extremes that a plain min and max let stretch the range, and on a trained
horse2zebra model it came within a fraction of a dB of percentile ranges, which hold every tensor of every image in
memory (many GB at 256 px).

What it costs. `quantize_onnx` measures the int8 file against the fp32 one on held-out images of the same folder
and returns the figures (`QuantizeReport`); docs/performance.md has them for a trained model on real photos.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .data import BadImageError, eval_transform, list_images, load_rgb, to_uint8
from .export import IMAGE, INPUT, MIN_OPSET, ExportError, read_onnx_metadata, unreadable
from .extras import require
from .files import atomic_write

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


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _moves_values_only(node) -> bool:
    """Reflection pads and nearest upsampling copy values without computing new ones, so quantizing before them
    gives the same uint8 tensor as quantizing after them (a constant pad would not: its 0 is no uint8 0)."""
    mode = next((attr.s for attr in node.attribute if attr.name == "mode"), None)
    if node.op_type == "Resize":
        return mode in (None, b"nearest")
    return node.op_type == "Pad" and mode in (b"reflect", b"edge")


def _data_movement_in_uint8(proto) -> None:
    """Run the pads and upsampling on the quantized tensors, in place; the file computes the same numbers.

    The quantizer writes them between a DequantizeLinear and a QuantizeLinear (or, after an fp32 ReLU, with no
    DequantizeLinear before them). ONNX Runtime fuses that pattern into a uint8 op for Resize alone, and only when
    both quantization nodes are there, so each pad and upsampling otherwise dequantizes a full feature map, copies
    it in fp32 and quantizes it again. Here the op takes the quantized tensor (the DequantizeLinear's input, or a
    QuantizeLinear moved in front of it) and feeds the convolution's DequantizeLinear directly."""
    from onnx import helper

    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    outputs = {output.name for output in graph.output}
    removed, moved = set(), set()
    for node in list(graph.node):
        after = consumers.get(node.output[0], [])
        if not _moves_values_only(node) or not after or any(q.op_type != "QuantizeLinear" for q in after):
            continue
        if outputs & {node.output[0], *(q.output[0] for q in after)} or not all(q.name for q in after):
            continue  # a graph output keeps its name; unnamed nodes could not be told apart below
        params = list(after[0].input[1:])  # scale and zero point, the same for both ends of the op
        if any(list(q.input[1:]) != params for q in after):
            continue
        before = producers.get(node.input[0])
        if before is not None and before.op_type == "DequantizeLinear" and list(before.input[1:]) == params:
            node.input[0] = before.input[0]
        else:
            quantize = helper.make_node(
                "QuantizeLinear", [node.input[0], *params], [f"{node.output[0]}_input_quantized"],
                name=f"{node.name}_input_QuantizeLinear",
            )  # fmt: skip
            graph.node.insert(list(graph.node).index(node), quantize)
            node.input[0] = quantize.output[0]
        for q in after:
            for consumer in consumers.get(q.output[0], []):
                consumer.input[:] = [node.output[0] if name == q.output[0] else name for name in consumer.input]
            removed.add(q.name)
        moved.add(node.output[0])
    # Shape nodes read the quantized tensor too (the exported ILN asks for its input's size): ONNX Runtime
    # would give each of them a dequantized copy of the whole map.
    for node in graph.node:
        before = producers.get(node.input[0]) if node.op_type == "Shape" else None
        if before is not None and before.op_type == "DequantizeLinear":
            node.input[0] = before.input[0]
    used = set(_consumers(graph)) | outputs
    kept = [
        node for node in graph.node
        if node.name not in removed and (node.op_type != "DequantizeLinear" or node.output[0] in used)
    ]  # fmt: skip
    del graph.node[:]
    graph.node.extend(kept)
    value_info = [info for info in graph.value_info if info.name not in moved]  # their dtype is uint8 now
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _narrow_convolutions_on_blocks(proto) -> None:
    """Compute each fp32 narrow convolution (the RGB output layer) on 2 x 2 blocks of its input, in place.

    ONNX Runtime's fp32 kernels work on blocks of 8 or 16 output channels, so a 3-channel layer does the work of
    a 16-channel one. On the input rearranged by SpaceToDepth, the same layer is a convolution with 4 times the
    channels in and out and a kernel about half as wide, whose outputs DepthToSpace puts back in place: the same
    sums in another order. The input (after two 2x upsamplings and a reflection pad of 3) has even sides."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    narrow = set(_narrow_convolutions(proto))
    for node in [node for node in graph.node if node.name in narrow]:
        attributes = {attr.name: np.ravel(helper.get_attribute_value(attr)) for attr in node.attribute}
        if not all(set(attributes.get(key, [default])) == {default} for key, default in
                   (("strides", 1), ("dilations", 1), ("pads", 0), ("group", 1))):  # fmt: skip
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        out, cin, kh, kw = weight.shape
        blocks = np.zeros((2, 2, out, 2, 2, cin, kh // 2 + 1, kw // 2 + 1), weight.dtype)
        for a, b, u, v in np.ndindex(2, 2, kh, kw):  # output phase (a, b), kernel tap (u, v)
            (m, p), (n, q) = divmod(a + u, 2), divmod(b + v, 2)
            blocks[a, b, :, p, q, :, m, n] = weight[:, :, u, v]
        name = node.name
        tensors = [numpy_helper.from_array(blocks.reshape(4 * out, 4 * cin, *blocks.shape[-2:]), f"{name}_blocks_W")]
        if len(node.input) > 2:
            bias = numpy_helper.to_array(initializers[node.input[2]])
            tensors.append(numpy_helper.from_array(np.tile(bias, 4), f"{name}_blocks_B"))
        graph.initializer.extend(tensors)
        replacement = [
            helper.make_node("SpaceToDepth", [node.input[0]], [f"{name}_blocks_in"], blocksize=2, name=f"{name}_s2d"),
            helper.make_node("Conv", [f"{name}_blocks_in", *(t.name for t in tensors)], [f"{name}_blocks_out"],
                             name=f"{name}_blocks"),
            helper.make_node("DepthToSpace", [f"{name}_blocks_out"], list(node.output), blocksize=2, mode="DCR",
                             name=f"{name}_d2s"),
        ]  # fmt: skip
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
    used = set(_consumers(graph))  # the replaced layers' own weights are no longer
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


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
    if images < 1:
        raise ExportError(f"images={images}: calibrating takes at least 1 image")
    if Path(out_path).resolve() == source.resolve():
        raise ExportError(f"{out_path} is the fp32 source itself; write the int8 file under another name")
    try:
        proto = onnx.load(str(source))
    except Exception as exc:  # protobuf's DecodeError and onnx's own derive from Exception
        raise unreadable(source, exc) from None
    meta, config = read_onnx_metadata(_metadata(proto), str(source))
    if PRECISION_KEY in meta:
        raise ExportError(f"{source} is already {meta[PRECISION_KEY]}; quantize the fp32 export instead")
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"{source} has opset {opset}; int8 needs {MIN_OPSET} or later: export it with --opset 17")
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
                per_channel=True, reduce_range=True, op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=_narrow_convolutions(proto),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibMovingAverage": True},
            )  # fmt: skip
        proto = onnx.load(str(quantized))
        _data_movement_in_uint8(proto)
        _narrow_convolutions_on_blocks(proto)
        onnx.save(proto, str(quantized))
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
        value=f"static, QDQ, uint8 activations, 7-bit int8 weights per channel, {'/'.join(QUANTIZED_OPS)} in int8; "
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
