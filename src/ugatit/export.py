"""Deployment through ONNX: `export_onnx` writes one generator as an ONNX file (`onnx_runtime.py` runs such files).

The graph. Input `input`: N x 3 x H x W RGB, float32 in [-1, 1] (the generator's own range), or with `uint8=True`
uint8 in [0, 255], converted inside the graph exactly as `data.to_tensor` does. Output `image`: the translation in the
input's convention (uint8 outputs are rounded as `data.to_image` rounds). Optional output `heatmap`: the raw CAM map,
float32 N x 1 x H/4 x W/4, the channel sum of the attended bottleneck features, exactly what the PyTorch generator
returns. It is left unnormalised and unresized because the min-max normalisation is per image and the colouring is a
host-side choice; `visualize.overlay_heatmap` renders it as `Translator.translate_with_heatmap` does.

Shapes. The batch axis is always dynamic. A light generator pools its bottleneck before the MLP, so H and W are
dynamic too (multiples of 4, at least 8). A full generator's MLP reads the whole flattened bottleneck, which binds it
to its trained size: the graph has a fixed H = W = img_size, the metadata says so, and `OnnxTranslator.run` refuses
other sizes with a message (ONNX Runtime itself fails with a shape error deep inside a Reshape or MatMul).

Exporter. The TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) at opset 17 is the default: it
exports this network quickly and matches eager PyTorch within the tests' tolerance. The `torch.export`-based
exporter (`dynamo=True`) gives the same numbers but is many times slower even for a tiny model, needs onnxscript,
and cannot write below opset 18 (its reflection Pad does not convert down). Opset 17 runs on ONNX Runtime >= 1.13,
TensorRT >= 8.6 and OpenVINO; every operator used here exists there. PyTorch has deprecated the TorchScript exporter
since 2.9; should a release drop it, pass `dynamo=True`. The parts that need care export as follows, and the tests
check each at a size other than the traced one: ReflectionPad2d -> Pad(mode="reflect"); adaptive pooling to 1 x 1 ->
GlobalAveragePool / GlobalMaxPool, which are shape-agnostic; ILN / AdaILN -> their per-(sample, channel)
scale-and-shift form (`norms.instance_layer_norm_affine`: two ReduceMeans, then three element-wise passes instead of
about fifteen, with the n / (n - 1) factors computed from the runtime shape); nearest Upsample x2 -> Resize(nearest,
scales 2).

Reduced precision: `quantize.quantize_onnx` turns such a file into an int8 one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__, fast
from .config import ModelConfig, model_config_from_dict, model_config_to_json
from .data import to_uint8
from .extras import require
from .files import atomic_write
from .inference import Translator

INPUT, IMAGE, HEATMAP = "input", "image", "heatmap"
FORMAT = "ugatit-onnx"
LEGACY_OPSET = 17  # the TorchScript exporter's default: widely deployed, and enough for every operator used
DYNAMO_OPSET = 18  # the lowest opset the torch.export-based exporter writes for this network
MIN_OPSET = 13  # the lowest opset written: per-channel int8 (`quantize`) needs DequantizeLinear's axis, from 13
MAX_ONNX_BYTES = 2**31 - 2**24  # one protobuf file holds < 2 GiB; keep some room for the graph itself

# Expected warnings of the TorchScript exporter, silenced so that a user sees only real problems.
_EXPORT_NOISE = (
    r"You are using the legacy TorchScript-based ONNX export",  # chosen on purpose, see the module docstring
    r"Constant folding - Only steps=1",  # slices with a step of -1 in the reflection pads; they run fine
    r"ONNX export mode is set to TrainingMode.EVAL, but operator 'instance_norm'",  # no running stats: right as is
    r"Converting a tensor to a Python boolean",  # PyTorch's own input-size checks in instance_norm, not the graph
)


class ExportError(ValueError):
    """An export or ONNX file that cannot do what was asked; the message says why and what to do instead."""


def unreadable(path: str | os.PathLike, exc: BaseException) -> ExportError:
    """The one-line error for a file that onnx or ONNX Runtime cannot read (theirs run to many lines)."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ExportError(f"{path}: not a readable ONNX file ({reason}); export it again (`ugatit export --format onnx`)")


def read_onnx_metadata(metadata: dict[str, str], source: str) -> tuple[dict[str, str], ModelConfig]:
    """The ugatit metadata of an exported file (its `metadata_props`, or ONNX Runtime's custom metadata map) and
    the model configuration it holds, or a one-line error naming `source` if it is not a ugatit export or damaged."""
    if metadata.get("format") != FORMAT:
        raise ExportError(f"{source}: not a ugatit ONNX export; export it with `ugatit export --format onnx`")
    missing = [key for key in ("config", "direction") if key not in metadata]
    try:
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        config = model_config_from_dict(json.loads(metadata["config"]), source)
    except ValueError as exc:  # json's errors and the configuration's are ValueErrors
        raise ExportError(f"{source}: damaged ugatit metadata ({exc}); export the model again") from None
    return metadata, config


class _Deployable(nn.Module):
    """The generator as deployed: image in, image (and the raw heatmap) out, cam logits dropped."""

    def __init__(self, generator: nn.Module, heatmap: bool, uint8: bool) -> None:
        super().__init__()
        self.generator = generator
        self.heatmap = heatmap
        self.uint8 = uint8

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.uint8:  # the ops of data.to_tensor and data.to_image, so both conventions give the same pixels
            x = x.float().div(255).sub(0.5).div(0.5)
        image, _, heatmap = self.generator(x)
        if self.uint8:
            image = to_uint8(image)
        return (image, heatmap) if self.heatmap else image


def _metadata(
    config: ModelConfig, direction: str, heatmap: bool, uint8: bool, exporter: str, opset: int
) -> dict[str, str]:
    size = config.img_size
    if config.light:
        shape = "N x 3 x H x W, N, H and W dynamic (H and W multiples of 4, at least 8)"
    else:
        shape = f"N x 3 x {size} x {size}, N dynamic; full mode: fixed to the trained size"
    value_range = "uint8 [0, 255]" if uint8 else "float32 [-1, 1]"
    meta = {
        "format": FORMAT,
        "ugatit_version": __version__,
        "direction": direction,
        "img_size": str(size),
        "light": str(config.light).lower(),
        "dynamic_size": str(config.light).lower(),
        "config": model_config_to_json(config),
        "input_shape": shape,
        "input_range": f"{value_range}, RGB",
        "output_range": f"{value_range}, RGB",
        "outputs": f"{IMAGE},{HEATMAP}" if heatmap else IMAGE,
        "exporter": exporter,
        "opset": str(opset),
    }
    if heatmap:
        meta["heatmap"] = "raw CAM map: channel sum of the attended bottleneck, float32 N x 1 x H/4 x W/4, unnormalised"
    return meta


def _export_graph(model: nn.Module, example: torch.Tensor, path: Path, light: bool, dynamo: bool, opset: int) -> None:
    outputs = [IMAGE, HEATMAP] if model.heatmap else [IMAGE]
    if dynamo:
        batch = torch.export.Dim("batch", min=1)
        dims = {0: batch}
        if light:
            dims |= {2: 4 * torch.export.Dim("height_4", min=2), 3: 4 * torch.export.Dim("width_4", min=2)}
        torch.onnx.export(
            model, (example,), path, dynamo=True, opset_version=opset, input_names=[INPUT], output_names=outputs,
            dynamic_shapes={"x": dims}, external_data=False, verbose=False,
        )  # fmt: skip
        return
    names = {0: "batch", 2: "height", 3: "width"} if light else {0: "batch"}
    axes = {INPUT: names, IMAGE: names}
    if model.heatmap:
        axes[HEATMAP] = {0: "batch", 2: "height_4", 3: "width_4"} if light else {0: "batch"}
    with warnings.catch_warnings():
        for message in _EXPORT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")  # same choice
        torch.onnx.export(
            model, (example,), path, dynamo=False, opset_version=opset, input_names=[INPUT], output_names=outputs,
            dynamic_axes=axes,
        )  # fmt: skip


def export_onnx(
    checkpoint_or_translator: str | os.PathLike | Translator,
    out_path: str | os.PathLike,
    direction: str | None = None,
    heatmap: bool = False,
    uint8: bool = False,
    opset: int | None = None,
    dynamo: bool = False,
) -> Path:
    """Write the `direction` generator as an ONNX file at `out_path` (atomically); returns the path.

    `checkpoint_or_translator` is any of our checkpoints (its `direction` generator is loaded, "A2B" by default) or
    a `Translator` (its own weights, through the exact layers if it runs fast: the fused kernels have no ONNX
    form, and ONNX Runtime brings its own kernels; `direction`, if given, must be the translator's). `heatmap` adds
    the `heatmap` output, `uint8` makes input and output uint8 in [0, 255].
    `opset` defaults to 17 with the TorchScript exporter and 18 with `dynamo=True` (see the module docstring for
    why TorchScript is the default).
    """
    onnx = require("onnx", "onnx")
    if isinstance(checkpoint_or_translator, Translator):
        translator = checkpoint_or_translator
        if direction not in (None, translator.direction):
            raise ExportError(f"direction={direction!r}, but the translator translates {translator.direction}")
    else:
        translator = Translator.from_checkpoint(checkpoint_or_translator, direction or "A2B")
    if opset is None:
        opset = DYNAMO_OPSET if dynamo else LEGACY_OPSET
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset={opset}: ugatit writes opsets {MIN_OPSET} to {newest} (the installed onnx's newest)")
    if dynamo and opset < DYNAMO_OPSET:
        raise ExportError(f"opset={opset}: the dynamo exporter writes opset {DYNAMO_OPSET} or later")
    config, generator = translator.config, translator.generator
    weight_bytes = sum(p.numel() * p.element_size() for p in generator.parameters())
    if weight_bytes > MAX_ONNX_BYTES:
        raise ExportError(
            f"the generator holds {weight_bytes / 2**30:.1f} GiB of weights, more than one ONNX file can hold (2 GiB); "
            "full-mode generators grow with img_size squared: export a light model, or a smaller img_size"
        )
    model = _Deployable(generator, heatmap, uint8).eval()
    size = config.img_size
    # A batch of 2 so that no exporter specialises the batch axis to 1.
    example = torch.zeros(2, 3, size, size, device=translator.device)
    example = example.to(torch.uint8) if uint8 else example
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), fast.exact(generator):
        graph = Path(tmp) / "model.onnx"
        _export_graph(model, example, graph, config.light, dynamo, opset)
        proto = onnx.load(str(graph))
    exporter = "torch.onnx dynamo" if dynamo else "torch.onnx torchscript"
    for key, value in _metadata(config, translator.direction, heatmap, uint8, exporter, opset).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "ugatit", __version__
    onnx.checker.check_model(proto)
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: onnx.save(proto, str(tmp)))
    return out_path
