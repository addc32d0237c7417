"""Which translator runs a model: `load_translator` opens a checkpoint, a run folder, a Hub-style folder or an
`.onnx` file on the torch or the ONNX Runtime backend."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from . import __version__
from .checkpoint import resolve_model, sha256_of
from .devices import resolve_device
from .export import ExportError, export_onnx
from .inference import Translator
from .onnx_runtime import OnnxTranslator

BACKENDS = ("torch", "onnxruntime")


def resolve_backend(path: str | os.PathLike, backend: str | None = None) -> str:
    """`backend`, or where it is None the one that runs `path`: ONNX Runtime for an `.onnx` file, else torch."""
    if backend is None:
        return "onnxruntime" if Path(path).suffix.lower() == ".onnx" else "torch"
    if backend not in BACKENDS:
        raise ExportError(f"backend={backend!r} must be one of: {', '.join(BACKENDS)}")
    return backend


def load_translator(
    path: str | os.PathLike,
    direction: str | None = None,
    backend: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    precision: str = "exact",
    fast_dtype: str = "auto",
) -> Translator | OnnxTranslator:
    """A translator for a checkpoint (file or folder) or an `.onnx` file, on the `torch` or `onnxruntime` backend.

    A checkpoint is a model file, a checkpoint folder, a Hub-style folder or a run folder (its latest checkpoint).
    `backend` defaults to the one the file needs (`resolve_backend`). `device` is 'cpu', 'cuda' ('cuda:N') or
    'auto': the GPU when the backend can use one here. `direction` defaults to "A2B" for checkpoints and to the
    file's own for ONNX files (where a different one is an error: an ONNX file holds one generator). With backend
    onnxruntime a checkpoint is exported on the fly, with the heatmap output; into a temporary file by default, or
    into `cache_dir`, keyed by the checkpoint's contents, the direction and the ugatit and torch versions, so that
    later calls skip the export. `precision` and `fast_dtype` are the torch backend's (`inference.Translator`); ONNX
    Runtime brings its own kernels.
    """
    path = Path(path)
    backend = resolve_backend(path, backend)
    if backend == "onnxruntime" and precision != "exact":
        raise ExportError(
            f"precision={precision!r} (--precision {precision}) is the torch backend's; ONNX Runtime runs an ONNX "
            "graph as exported"
        )
    if path.suffix.lower() == ".onnx":
        if backend != "onnxruntime":
            raise ExportError(f"{path} is an ONNX file, which the onnxruntime backend runs")
        translator = OnnxTranslator.from_file(path, device, batch_size)
        if direction not in (None, translator.direction):
            raise ExportError(f"{path} translates {translator.direction}, not {direction}")
        return translator
    direction = direction or "A2B"
    if backend == "torch":
        return Translator.from_checkpoint(path, direction, resolve_device(device), batch_size, precision, fast_dtype)
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(path, Path(tmp) / "model.onnx", direction, heatmap=True)
            return OnnxTranslator.from_file(exported, device, batch_size)
    key = f"{sha256_of(resolve_model(path))} {direction} {__version__} {torch.__version__}"
    key = hashlib.sha256(key.encode()).hexdigest()
    cached = Path(cache_dir) / f"ugatit-{direction}-{key[:24]}.onnx"
    if not cached.is_file():
        export_onnx(path, cached, direction, heatmap=True)
    return OnnxTranslator.from_file(cached, device, batch_size)
