"""Deployment through ONNX: `export_onnx` writes one generator as an ONNX file, `OnnxTranslator` runs such a file
with ONNX Runtime behind the interface of `inference.Translator`, and `load_translator` picks a backend.

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
exports this network in about a second and matches eager PyTorch to ~1e-6. The `torch.export`-based exporter
(`dynamo=True`) gives the same numbers but takes 10-20 s even for a tiny model, needs onnxscript, and cannot write
below opset 18 (its reflection Pad does not convert down). Opset 17 runs on ONNX Runtime >= 1.13, TensorRT >= 8.6 and
OpenVINO; every operator used here exists there. PyTorch has deprecated the TorchScript exporter since 2.9; should a
release drop it, pass `dynamo=True`. The parts that need care export as follows, and the tests check each at a size
other than the traced one: ReflectionPad2d -> Pad(mode="reflect"); adaptive pooling to 1 x 1 -> GlobalAveragePool /
GlobalMaxPool, which are shape-agnostic; the unbiased `torch.var` of ILN / AdaILN -> ReduceMean with the n / (n - 1)
factor computed from the runtime shape; nearest Upsample x2 -> Resize(nearest, scales 2).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .checkpoint import atomic_write, model_file
from .config import Config
from .data import to_image
from .inference import ImageTranslator, Translator, default_batch_size, resolve_batch_size
from .models import build_generator

INPUT, IMAGE, HEATMAP = "input", "image", "heatmap"
FORMAT = "ugatit-onnx"
LEGACY_OPSET = 17  # the TorchScript exporter's default: widely deployed, and enough for every operator used
DYNAMO_OPSET = 18  # the lowest opset the torch.export-based exporter writes for this network
MAX_ONNX_BYTES = 2**31 - 2**24  # one protobuf file holds < 2 GiB; keep some room for the graph itself
BACKENDS = ("torch", "onnxruntime")

# Expected warnings of the TorchScript exporter, silenced so that a user sees only real problems.
_EXPORT_NOISE = (
    r"You are using the legacy TorchScript-based ONNX export",  # chosen on purpose, see the module docstring
    r"Constant folding - Only steps=1",  # slices with a step of -1 in the reflection pads; they run fine
    r"ONNX export mode is set to TrainingMode.EVAL, but operator 'instance_norm'",  # no running stats: right as is
    r"Converting a tensor to a Python boolean",  # PyTorch's own input-size checks in instance_norm, not the graph
)


class ExportError(ValueError):
    """An export or ONNX file that cannot do what was asked; the message says why and what to do instead."""


def _require(module: str) -> ModuleType:
    """Import an optional dependency of the `onnx` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed; install it with: pip install 'ugatit[onnx]'") from None


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
            image = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return (image, heatmap) if self.heatmap else image


def _metadata(config: Config, direction: str, heatmap: bool, uint8: bool, exporter: str, opset: int) -> dict[str, str]:
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
        "config": config.to_json(),
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
    a `Translator` (its own weights, through the exact fp32 layers if it was built fast; `direction`, if given, must
    be the translator's). `heatmap` adds the `heatmap` output, `uint8` makes input and output uint8 in [0, 255].
    `opset` defaults to 17 with the TorchScript exporter and 18 with `dynamo=True` (see the module docstring for
    why TorchScript is the default).
    """
    onnx = _require("onnx")
    if isinstance(checkpoint_or_translator, Translator):
        translator = checkpoint_or_translator
        if direction not in (None, translator.direction):
            raise ExportError(f"direction={direction!r}, but the translator translates {translator.direction}")
    else:
        translator = Translator.from_checkpoint(checkpoint_or_translator, direction or "A2B")
    opset = opset or (DYNAMO_OPSET if dynamo else LEGACY_OPSET)
    if dynamo and opset < DYNAMO_OPSET:
        raise ExportError(f"opset={opset}: the dynamo exporter writes opset {DYNAMO_OPSET} or later")
    config, generator = translator.config, translator.generator
    weight_bytes = sum(p.numel() * p.element_size() for p in generator.parameters())
    if weight_bytes > MAX_ONNX_BYTES:
        raise ExportError(
            f"the generator holds {weight_bytes / 2**30:.1f} GiB of weights, more than one ONNX file can hold (2 GiB); "
            "full-mode generators grow with img_size squared: export a light model, or a smaller img_size"
        )
    if any(getattr(module, "fast", False) for module in generator.modules()):
        # The fast kernels are eager autograd Functions with no ONNX form; the exact layers compute the same
        # function from the same weights, and ONNX Runtime brings its own kernels.
        generator = build_generator(config.replace(precision="exact")).to(translator.device).eval()
        generator.load_state_dict(translator.generator.state_dict())
    model = _Deployable(generator, heatmap, uint8).eval()
    size = config.img_size
    # A batch of 2 so that no exporter specialises the batch axis to 1.
    example = torch.zeros(2, 3, size, size, device=translator.device)
    example = example.to(torch.uint8) if uint8 else example
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
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


def _providers(device: str | torch.device, available: Sequence[str]) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers for `device`: 'cpu', 'cuda' / 'cuda:N', or 'auto' (CUDA when this onnxruntime has it)."""
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ExportError(f"device={str(device)!r}: the onnxruntime backend runs on 'cpu' or 'cuda'")
    if "CUDAExecutionProvider" not in available:
        raise ExportError(
            "device 'cuda' was asked for, but this onnxruntime has no CUDA provider (install onnxruntime-gpu); "
            "use device='cpu'"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OnnxTranslator(ImageTranslator):
    """An exported generator run by ONNX Runtime, called like `inference.Translator` (so `translate_files` takes it).

    Images go through the same `eval_transform` and 8-bit conversion as with the PyTorch translator, so both give the
    same pixels up to float rounding. `run` is the array-level entry point for callers with their own pre-processing.
    """

    def __init__(self, session: Any, batch_size: int | None = None, source: str = "ONNX model") -> None:
        self.session = session
        self.source = source
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("format") != FORMAT or "config" not in self.metadata:
            raise ExportError(f"{source}: not a ugatit ONNX export (no ugatit metadata); export it with export_onnx")
        self.config = Config.from_dict(json.loads(self.metadata["config"]))
        self.direction = self.metadata["direction"]
        self.batch_size = resolve_batch_size(batch_size, default_batch_size(self.device))
        self.uint8 = session.get_inputs()[0].type == "tensor(uint8)"
        self.has_heatmap = HEATMAP in {output.name for output in session.get_outputs()}

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int | None = None
    ) -> OnnxTranslator:
        """Open a file written by `export_onnx`; `device` 'cpu', 'cuda' (needs onnxruntime-gpu) or 'auto'."""
        ort = _require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        providers = _providers(device, ort.get_available_providers())
        session = ort.InferenceSession(str(path), providers=providers)
        if providers[0] != "CPUExecutionProvider" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise ExportError(f"{path}: onnxruntime could not start its CUDA provider here; use device='cpu'")
        return cls(session, batch_size, str(path))

    @property
    def device(self) -> torch.device:
        if self.session.get_providers()[0] == "CUDAExecutionProvider":
            return torch.device("cuda", int(self.session.get_provider_options()["CUDAExecutionProvider"]["device_id"]))
        return torch.device("cpu")

    def check_input(self, shape: Sequence[int]) -> None:
        """Refuse a batch shape the graph cannot take, with the reason and the sizes it can."""
        if len(shape) != 4 or shape[1] != 3:
            raise ExportError(f"{self.source}: expects N x 3 x H x W RGB batches, got shape {tuple(shape)}")
        height, width = shape[2], shape[3]
        size = self.config.img_size
        if not self.config.light and (height, width) != (size, size):
            raise ExportError(
                f"{self.source}: a full-mode model only takes {size}x{size} images (its MLP reads the whole "
                f"bottleneck), got {height}x{width}; resize the input, or export a light model for other sizes"
            )
        if height % 4 or width % 4 or min(height, width) < 8:
            raise ExportError(
                f"{self.source}: height and width must be multiples of 4 and at least 8, got {height}x{width}"
            )

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch through the graph: (images, raw heatmaps or None), in the file's value convention."""
        if self.uint8 and x.dtype != np.uint8:
            raise ExportError(f"{self.source}: this export takes uint8 input in [0, 255], got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.uint8 if self.uint8 else np.float32)
        self.check_input(x.shape)
        outputs = self.session.run([IMAGE, HEATMAP] if self.has_heatmap else [IMAGE], {INPUT: x})
        return outputs[0], outputs[1] if self.has_heatmap else None

    def translate_with_heatmap(
        self, images: Image.Image | Sequence[Image.Image], original_size: bool = False, batch_size: int | None = None
    ) -> tuple[Image.Image, Image.Image] | list[tuple[Image.Image, Image.Image]]:
        """As `Translator.translate_with_heatmap`; needs a file exported with `heatmap=True`."""
        if not self.has_heatmap:
            raise ExportError(f"{self.source} has no heatmap output; export it again with heatmap=True")
        return super().translate_with_heatmap(images, original_size, batch_size)

    def _forward(self, inputs: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor | None]:
        # Exact inverse of data.to_tensor: the uint8 graph sees the very pixels the float one would.
        array = np.rint((inputs.numpy() + 1) * 127.5).astype(np.uint8) if self.uint8 else inputs.numpy()
        outputs, heatmaps = self.run(array)
        images = [self._to_image(output) for output in outputs]
        return images, None if heatmaps is None else torch.from_numpy(heatmaps)

    def _to_image(self, output: np.ndarray) -> Image.Image:
        """One 3 x H x W graph output as an 8-bit image (uint8 graphs already rounded like data.to_image)."""
        return Image.fromarray(output.transpose(1, 2, 0)) if self.uint8 else to_image(torch.from_numpy(output))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def load_translator(
    path: str | os.PathLike,
    direction: str | None = None,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    fast: bool = False,
) -> Translator | OnnxTranslator:
    """A translator for a checkpoint (file or folder) or an `.onnx` file, on the `torch` or `onnxruntime` backend.

    `device` is 'cpu', 'cuda' ('cuda:N') or 'auto': the GPU when the backend can use one here.
    `direction` defaults to "A2B" for checkpoints and to the file's own for ONNX files (where a different one is an
    error: an ONNX file holds one generator). With backend onnxruntime a checkpoint is exported on the fly, with the
    heatmap output; into a temporary file by default, or into `cache_dir`, keyed by the checkpoint's contents, the
    direction and the ugatit and torch versions, so that later calls skip the export. `fast` selects the torch
    backend's fast path (bf16 where the device has bf16 hardware).
    """
    if backend not in BACKENDS:
        raise ExportError(f"backend={backend!r} must be one of: {', '.join(BACKENDS)}")
    path = Path(path)
    if path.suffix == ".onnx":
        if backend != "onnxruntime":
            raise ExportError(f"{path} is an ONNX file: use backend='onnxruntime'")
        translator = OnnxTranslator.from_file(path, device, batch_size)
        if direction not in (None, translator.direction):
            raise ExportError(f"{path} translates {translator.direction}, not {direction}")
        return translator
    direction = direction or "A2B"
    if backend == "torch":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return Translator.from_checkpoint(path, direction, device, batch_size, fast)
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(path, Path(tmp) / "model.onnx", direction, heatmap=True)
            return OnnxTranslator.from_file(exported, device, batch_size)
    source = model_file(path)
    key = hashlib.sha256(f"{_file_digest(source)} {direction} {__version__} {torch.__version__}".encode()).hexdigest()
    cached = Path(cache_dir) / f"ugatit-{direction}-{key[:24]}.onnx"
    if not cached.is_file():
        export_onnx(path, cached, direction, heatmap=True)
    return OnnxTranslator.from_file(cached, device, batch_size)
