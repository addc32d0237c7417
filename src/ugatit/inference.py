"""Translate images with a trained generator: `Translator` for Python callers, `translate_files` for the CLI.

Inference follows the official test path: each image is read as `data.load_rgb` reads files (`data.to_rgb`), resized
to the trained `img_size` (or, with `keep_aspect`, shorter side + centre crop) by `data.eval_transform`, the
generator runs under `torch.inference_mode` (in fp32, or on the fast path with `precision="fast"`), and its [-1, 1]
output becomes 8-bit RGB. Batching only changes speed: every normalisation in the generator is per
sample, so no image sees another one's statistics.

`translate_files` does every check before it writes anything (inputs exist, are decodable, no output exists
unless overwriting is asked for, no output lands on an input), so a refused job leaves the output folder as it was.
It takes any translator: this module's, or the ONNX Runtime one (`onnx_runtime.py`).
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from . import fast
from .checkpoint import describe_source, fit_states, load_model, resolve_model
from .config import ModelConfig, check_precision
from .data import LOAD_THREADS, eval_transform, list_images, load_rgb, parallel_map, to_image, to_rgb
from .devices import ieee_fp32
from .models import build_generator, generator_name
from .visualize import overlay_heatmap, save_image

HEATMAP_SUFFIX = "_heatmap"
OUTPUT_SUFFIX = ".png"  # lossless whatever the input format, so outputs are exactly what the model produced


class ImageTranslator:
    """What every backend shares: PIL images in, the official test transform, batching, PIL images out.

    A backend supplies `config`, `direction`, `batch_size`, `source` (what was loaded, for messages) and
    `_forward(inputs) -> (images, raw heatmaps)` for a batch of N x 3 x H x W tensors in [-1, 1].
    """

    config: ModelConfig
    direction: str
    batch_size: int
    source: str
    has_heatmap: bool = True  # whether `translate_with_heatmap` can work (an ONNX file may lack the output)

    def _forward(self, inputs: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor | None]:
        raise NotImplementedError

    def __call__(
        self, image: Image.Image | Sequence[Image.Image], original_size: bool = False, batch_size: int | None = None
    ) -> Image.Image | list[Image.Image]:
        """Translate one image (returns one) or a sequence (returns a list, in order)."""
        if isinstance(image, Image.Image):
            return self._translate([image], original_size, False, batch_size)[0][0]
        return [out for out, _ in self._translate(list(image), original_size, False, batch_size)]

    def translate_with_heatmap(
        self, images: Image.Image | Sequence[Image.Image], original_size: bool = False, batch_size: int | None = None
    ) -> tuple[Image.Image, Image.Image] | list[tuple[Image.Image, Image.Image]]:
        """Like calling the translator, plus the CAM attention heatmap blended over the image the model saw.

        The overlay is drawn on the resized (or cropped) model input rather than the original, so the heatmap lines
        up with what was attended to; with `original_size` it is then resized back like the translation.
        """
        if isinstance(images, Image.Image):
            return self._translate([images], original_size, True, batch_size)[0]
        return self._translate(list(images), original_size, True, batch_size)

    def _translate(
        self, images: list[Image.Image], original_size: bool, heatmap: bool, batch_size: int | None
    ) -> list[tuple[Image.Image, Image.Image | None]]:
        size = resolve_batch_size(batch_size, self.batch_size)
        results = []
        for start in range(0, len(images), size):
            chunk = [to_rgb(img) for img in images[start : start + size]]  # as files are read (upright, etc.)
            inputs = torch.stack([eval_transform(img, self.config.img_size, self.config.keep_aspect) for img in chunk])
            outputs, heatmaps = self._forward(inputs)
            for i, (img, out) in enumerate(zip(chunk, outputs, strict=True)):
                overlay = overlay_heatmap(inputs[i], heatmaps[i]) if heatmap else None
                if original_size:
                    out = resize_to(out, img.size)
                    overlay = None if overlay is None else resize_to(overlay, img.size)
                results.append((out, overlay))
        return results


def resolve_batch_size(batch_size: int | None, default: int) -> int:
    """`batch_size`, or `default` where it is None; anything under 1 is refused."""
    size = default if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"batch_size={size} must be a positive integer")
    return size


def default_batch_size(device: torch.device) -> int:
    """Images per generator call when none is asked for: 8 on a GPU, 1 on a CPU, where larger batches took longer
    per image (docs/performance.md, "Translation")."""
    return 8 if device.type == "cuda" else 1


class Translator(ImageTranslator):
    """One generator in eval mode with the model config it was trained with; call it on PIL images.

    Results come at the trained `img_size`, the only size a full (non-light) generator accepts; `original_size=True`
    resizes them back (bicubic) to each input's width x height. `batch_size` bounds how many images go through the
    generator at once, which bounds memory, not the number of images a call accepts (default: `default_batch_size`).
    `precision="fast"` swaps `ugatit.fast` into the generator and runs it autocast to `fast_dtype` ("auto": bf16
    where the device has bf16 units, else fp32), whatever the training run used; "exact" (the default) is the
    official fp32 computation. The translator owns how its generator computes: it swaps the fast kernels in or out.
    """

    def __init__(
        self,
        generator: nn.Module,
        config: ModelConfig,
        direction: str = "A2B",
        batch_size: int | None = None,
        precision: str = "exact",
        fast_dtype: str = "auto",
        source: str = "generator",
    ) -> None:
        generator_name(direction)  # refuses an unknown direction now rather than at the first call
        check_precision(precision, fast_dtype)
        self.generator = generator.eval().requires_grad_(False)
        self.config = config
        self.direction = direction
        self.source = source
        self.batch_size = resolve_batch_size(batch_size, default_batch_size(self.device))
        self.precision = precision
        if precision == "fast":
            fast.apply(self.generator)
            self.dtype = fast.resolve_dtype(fast_dtype, self.device)
            self.memory_format = fast.memory_format(self.device, self.dtype)
        else:
            fast.remove(self.generator)
            self.dtype, self.memory_format = torch.float32, torch.contiguous_format
        self.generator.to(memory_format=self.memory_format)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        direction: str = "A2B",
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        precision: str = "exact",
        fast_dtype: str = "auto",
    ) -> Translator:
        """Build the `direction` generator from any of our checkpoints: a model file, a checkpoint folder, a
        Hub-style folder, or a run folder (its latest checkpoint, which `source` names).

        Only that generator is built and loaded; a checkpoint without it raises `CheckpointError`.
        """
        name = generator_name(direction)
        file = resolve_model(path)
        config, states = load_model(file, [name])
        generator = build_generator(config)
        fit_states({name: generator}, states, file)
        source = describe_source(path, file)
        return cls(generator.to(device), config, direction, batch_size, precision, fast_dtype, source)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def _forward(self, inputs: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor]:
        device = self.device
        x = inputs.to(device, memory_format=self.memory_format)
        with torch.inference_mode(), ieee_fp32(), fast.autocast(device, self.dtype):
            outputs, _, heatmaps = self.generator(x)
        return [to_image(y) for y in outputs.float().cpu()], heatmaps.float().cpu()


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class Job:
    """One input image and the file(s) its translation goes to (`heatmap` is None unless heatmaps are asked for)."""

    source: Path
    output: Path
    heatmap: Path | None = None


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def _expand_path(path: Path, label: str) -> list[tuple[Path, Path]]:
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise FileNotFoundError(f"{label}: the folder holds no images")
        return [(file, file.relative_to(path).with_name(file.stem)) for file in files]
    if path.is_file():
        return [(path, Path(path.stem))]
    raise FileNotFoundError(f"{label}: no such file or folder")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """Each input image with the name its output is derived from: a relative path without suffix.

    Files are named by their stem, images found in a folder by their path inside it, glob matches like files
    (a matching folder like a folder). An existing path is taken literally even when it contains glob characters.
    A file reached twice (say, by name and through its folder) is translated once, under its first name.
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.exists() or not _is_pattern(text):
            pairs = _expand_path(path, text)
        else:
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{text}: no file matches this pattern")
            pairs = [pair for match in matches for pair in _expand_path(Path(match), match)]
        for source, name in pairs:
            key = source.resolve()
            if key not in seen:
                seen.add(key)
                found.append((source, name))
    return found


def plan_outputs(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, heatmap: bool = False) -> list[Job]:
    """Where each input's outputs go: `<out_dir>/<name>.png` (+ `<name>_heatmap.png`), names made unique.

    A name already taken by an earlier input gets `_1`, `_2`, ... so inputs never overwrite each other, and the
    result depends only on the order of the inputs. Names are compared case-insensitively so the outputs also stay
    apart on case-insensitive file systems.
    """
    out_dir = Path(out_dir)
    taken: set[str] = set()
    jobs = []
    for source, name in expand_inputs(inputs):
        for n in itertools.count():
            base = name if n == 0 else name.with_name(f"{name.name}_{n}")
            files = [base.with_name(base.name + OUTPUT_SUFFIX)]
            if heatmap:
                files.append(base.with_name(base.name + HEATMAP_SUFFIX + OUTPUT_SUFFIX))
            keys = {file.as_posix().casefold() for file in files}
            if not keys & taken:
                break
        taken |= keys
        jobs.append(Job(source, out_dir / files[0], out_dir / files[1] if heatmap else None))
    return jobs


def check_outputs(outputs: Sequence[Path], sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before anything is written, an output that would replace an input, one where a folder is, one whose
    folder would have to be made where a file is, or an existing one unless `overwrite` (FileExistsError naming it)."""
    sources = {source.resolve() for source in sources}
    for path in outputs:
        if path.resolve() in sources:
            raise FileExistsError(f"{path} would overwrite its own input; choose another output folder")
        if path.is_dir():
            raise FileExistsError(f"{path} is a folder, where an output file would go; move it or choose another "
                                  "output folder")  # fmt: skip
    for folder in {path.parent for path in outputs}:
        nearest = next(p for p in (folder, *folder.parents) if os.path.lexists(p))  # what the folder is made under
        if not nearest.is_dir():
            raise FileExistsError(f"{nearest} is a file, not a folder; choose a folder for the outputs")
    if not overwrite:
        existing = [path for path in outputs if os.path.lexists(path)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise FileExistsError(f"{existing[0]} already exists{more}; pass --overwrite to replace it")


def _check_readable(jobs: list[Job]) -> None:
    """Fully decode every input now, so a corrupt one stops the job before any output is written."""
    # Raises the first BadImageError in input order; keeping only sizes bounds the memory used.
    parallel_map(lambda job: load_rgb(job.source).size, jobs)


def translate_files(
    translator: ImageTranslator,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    batch_size: int | None = None,
    heatmap: bool = False,
    original_size: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Translate image files, folders and glob patterns into `out_dir`; returns each input's output path, in order.

    Raises FileNotFoundError (missing input, unmatched pattern), BadImageError (undecodable input) or
    FileExistsError (an output exists and `overwrite` is False) before anything is written. Each file is written
    atomically; while a batch is translated, the next one is decoded and the previous one's files are written.
    `batch_size` defaults to the translator's own.
    """
    batch_size = resolve_batch_size(batch_size, translator.batch_size)
    jobs = plan_outputs(inputs, out_dir, heatmap)
    outputs = [path for job in jobs for path in (job.output, job.heatmap) if path is not None]
    check_outputs(outputs, [job.source for job in jobs], overwrite)
    _check_readable(jobs)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(LOAD_THREADS) as pool, tqdm(total=len(jobs), unit="img", disable=not progress) as bar:
        pending = [pool.submit(load_rgb, job.source) for job in batches[0]] if batches else []
        writing: list[Future] = []
        for index, batch in enumerate(batches):
            images = [future.result() for future in pending]
            if index + 1 < len(batches):
                pending = [pool.submit(load_rgb, job.source) for job in batches[index + 1]]
            if heatmap:
                results = translator.translate_with_heatmap(images, original_size, batch_size)
            else:
                results = [(out, None) for out in translator(images, original_size, batch_size)]
            _wait(writing, bar)
            writing = [pool.submit(_write, job, *result) for job, result in zip(batch, results, strict=True)]
        _wait(writing, bar)
    return [job.output for job in jobs]


def _write(job: Job, out: Image.Image, overlay: Image.Image | None) -> None:
    save_image(out, job.output)
    if overlay is not None:
        save_image(overlay, job.heatmap)


def _wait(writing: list[Future], bar: tqdm) -> None:
    """Wait for a batch's files, written while the next batch is translated (compressing a photo-sized PNG takes
    longer than translating it); a write that failed raises here."""
    for future in writing:
        future.result()
        bar.update(1)
