"""Running exported generators with ONNX Runtime: `OnnxTranslator`, called like `inference.Translator`.

Images go through the same `eval_transform` and 8-bit conversion as with the PyTorch translator, so both give the
same pixels up to float rounding. `OnnxTranslator.run` is the array-level entry point for callers with their own
pre-processing. The file format (inputs, outputs, metadata) is `export.py`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import to_image, to_uint8
from .export import HEATMAP, IMAGE, INPUT, ExportError, read_onnx_metadata, unreadable
from .extras import require
from .inference import ImageTranslator, default_batch_size, resolve_batch_size


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
        self.metadata, self.config = read_onnx_metadata(dict(session.get_modelmeta().custom_metadata_map), source)
        self.direction = self.metadata["direction"]
        self.batch_size = resolve_batch_size(batch_size, default_batch_size(self.device))
        self.uint8 = session.get_inputs()[0].type == "tensor(uint8)"
        self.has_heatmap = HEATMAP in {output.name for output in session.get_outputs()}

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int | None = None
    ) -> OnnxTranslator:
        """Open a file written by `export_onnx`; `device` 'cpu', 'cuda' (needs onnxruntime-gpu) or 'auto'."""
        ort = require("onnxruntime", "onnx")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        providers = _providers(device, ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime's error types (damaged protobuf, invalid graph) derive from Exception
            raise unreadable(path, exc) from None
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
        array = to_uint8(inputs).numpy() if self.uint8 else inputs.numpy()
        outputs, heatmaps = self.run(array)
        images = [self._to_image(output) for output in outputs]
        return images, None if heatmaps is None else torch.from_numpy(heatmaps)

    def _to_image(self, output: np.ndarray) -> Image.Image:
        """One 3 x H x W graph output as an 8-bit image (uint8 graphs already rounded like data.to_image)."""
        return Image.fromarray(output.transpose(1, 2, 0)) if self.uint8 else to_image(torch.from_numpy(output))
