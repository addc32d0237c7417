"""Score translations with KID and FID: two folders, a checkpoint on a dataset, or a run while it trains.

Every result records its full protocol (folders, image counts, resize rule, estimator settings, the Inception
weights' sha256, the ugatit version) because KID numbers are only comparable under the same protocol, and the
U-GAT-IT paper's own numbers were made with a non-standard one (docs/kid-protocol.md). The standard KID is
`kid` (torch-fidelity's subset estimator); `kid_blocks` and `mean_kid` are the authors' variants, for comparison.
Values are raw (KID is an MMD^2); only `format_table` multiplies KID by 100, as the paper's tables do.

Images reach the Inception network as files do: decoded to 8-bit RGB by `data.load_rgb`, scaled to [0, 1] at
their own size, resized to 299x299 inside the network. Translations are scored as 8-bit PNGs (the training-time
tracker quantises the same way), so a score never depends on how the images got to disk.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import __version__
from .checkpoint import read_model_config
from .config import check_precision, to_dict
from .data import LOAD_THREADS, DataError, eval_transform, list_images, load_rgb, parallel_map, to_rgb, to_uint8
from .devices import ieee_fp32
from .files import atomic_write
from .inception import FEATURE_DIM, WEIGHTS_NAME, InceptionFeatures
from .inference import Translator, default_batch_size, translate_files
from .metrics import fid, kid_blocks, kid_subsets, mean_kid, mmd2_unbiased
from .models import DIRECTIONS, generator_name

REAL_SPLITS = ("test", "train")

Weights = str | os.PathLike | InceptionFeatures | None
FeaturesOf = Callable[[Sequence[Path]], np.ndarray]


@dataclass(frozen=True)
class KIDSettings:
    """Estimator settings; the defaults are torch-fidelity's and the U-GAT-IT authors' (docs/kid-protocol.md):
    `n_subsets` draws of `subset_size` rows (seeded by `seed`) for the subset KID, blocks of at most
    `max_block_size` rows for the block KID."""

    n_subsets: int = 100
    subset_size: int = 1000
    seed: int = 0
    max_block_size: int = 10


def inception_model(weights: Weights = None) -> InceptionFeatures:
    """`weights` as a loaded model (reused as is), a weight file, or None for the standard file (see find_weights)."""
    return weights if isinstance(weights, InceptionFeatures) else InceptionFeatures(weights)


# ----------------------------------------------------------------------------------------------
# Features


def _as_image(item: Image.Image | str | os.PathLike) -> Image.Image:
    return to_rgb(item) if isinstance(item, Image.Image) else load_rgb(item)


def _to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> 3 x H x W float in [0, 1], at the image's own size."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def extract_features(
    images_or_paths: Iterable[Image.Image | str | os.PathLike],
    model: InceptionFeatures,
    batch_size: int = 32,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """N x 2048 float64 features of images (PIL images or files, in order); files are decoded by `load_rgb`.

    Images of different sizes may be mixed: within a batch, each size goes through the network separately
    (the network treats every image independently, so grouping changes nothing but speed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    items = list(images_or_paths)
    model = model.to(device).eval()
    out = np.empty((len(items), FEATURE_DIM))
    bar = tqdm(total=len(items), unit="img", desc="Inception features", disable=not progress)
    with ThreadPoolExecutor(LOAD_THREADS) as pool, bar:
        for start in range(0, len(items), batch_size):
            images = list(pool.map(_as_image, items[start : start + batch_size]))
            by_size: dict[tuple[int, int], list[int]] = {}
            for index, image in enumerate(images):
                by_size.setdefault(image.size, []).append(index)
            for indices in by_size.values():
                batch = torch.stack([_to_unit_tensor(images[i]) for i in indices]).to(device)
                out[[start + i for i in indices]] = _features(model, batch)
            bar.update(len(images))
    return out


def _features(model: InceptionFeatures, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode(), ieee_fp32():
        return model(batch).double().cpu().numpy()


def _images_in(folder: str | os.PathLike) -> list[Path]:
    files = list_images(folder)
    if not files:
        raise DataError(f"{folder} holds no images")
    return files


# ----------------------------------------------------------------------------------------------
# Scores and their protocol


def score_features(
    real: np.ndarray, fake: np.ndarray, source: np.ndarray | None = None, settings: KIDSettings = KIDSettings()
) -> dict[str, Any]:
    """Every metric of one real/fake pair of feature sets (plus mean KID when source features are given)."""
    kid_mean, kid_std = kid_subsets(real, fake, settings.n_subsets, settings.subset_size, settings.seed)
    block_mean, block_err = kid_blocks(real, fake, settings.max_block_size)
    scores: dict[str, Any] = {
        "kid": {"mean": kid_mean, "std": kid_std},
        "kid_blocks": {
            "mean": block_mean,
            "stderr": block_err,
            "n_blocks": math.ceil(max(len(real), len(fake)) / settings.max_block_size),
        },
        "mean_kid": None,
        "fid": fid(real, fake),
    }
    if source is not None:
        value, err = mean_kid(source, real, fake, settings.max_block_size)
        scores["mean_kid"] = {"mean": value, "stderr": err}
    return scores


def protocol(model: InceptionFeatures, settings: KIDSettings, n_real: int, n_fake: int) -> dict[str, Any]:
    """Everything a reader needs to reproduce (or refuse to compare) a score."""
    size = model.input_size
    return {
        "ugatit_version": __version__,
        "features": f"pool_3 ({FEATURE_DIM}-d) of the FID InceptionV3 (TF inception-2015-12-05, pytorch-fid port)",
        "inception_weights": {
            "file": str(model.weights_path),
            "sha256": model.sha256,
            "standard": model.standard,
            "expected": WEIGHTS_NAME,
        },
        "resize": (
            "decoded to 8-bit RGB (EXIF-upright, alpha over white), scaled to [0, 1], resized to "
            f"{size}x{size} bilinear (align_corners=False, no antialiasing), mapped to [-1, 1] (pytorch-fid)"
        ),
        "kernel": f"k(x, y) = (x . y / {FEATURE_DIM} + 1)^3",
        "kid": {
            "estimator": "torch-fidelity: mean and std (ddof=0) of unbiased MMD^2 over random subsets",
            "n_subsets": settings.n_subsets,
            "subset_size": min(settings.subset_size, n_real, n_fake),
            "subset_size_requested": settings.subset_size,
            "seed": settings.seed,
        },
        "kid_blocks": {
            "estimator": "TF-GAN blocks (U-GAT-IT authors): mean and standard error over consecutive blocks",
            "max_block_size": settings.max_block_size,
        },
        "mean_kid": "(0.02 * kid_blocks(real, fake) + 0.98 * kid_blocks(source, fake)) / 2, same for stderr",
        "fid": "||mu_r - mu_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^(1/2)), covariances with n - 1",
        "units": "raw values (KID is an MMD^2); tables report KID x 100",
    }


def _evaluate_files(
    fake: Sequence[Path],
    real: Sequence[Path],
    source: Sequence[Path] | None,
    model: InceptionFeatures,
    settings: KIDSettings,
    features_of: FeaturesOf,
) -> dict[str, Any]:
    real_f, fake_f = features_of(real), features_of(fake)
    source_f = features_of(source) if source is not None else None
    return {
        "n_fake": len(fake),
        "n_real": len(real),
        "n_source": None if source is None else len(source),
        **score_features(real_f, fake_f, source_f, settings),
        "protocol": protocol(model, settings, len(real), len(fake)),
    }


def _feature_cache(model: InceptionFeatures, batch_size: int, progress: bool, device: str | torch.device) -> FeaturesOf:
    """Features by file list, computed once: in "both" directions each real folder is used twice."""
    cache: dict[tuple[Path, ...], np.ndarray] = {}

    def features_of(paths: Sequence[Path]) -> np.ndarray:
        key = tuple(Path(p).resolve() for p in paths)
        if key not in cache:
            cache[key] = extract_features(paths, model, batch_size, progress, device)
        return cache[key]

    return features_of


def evaluate_folders(
    fake_dir: str | os.PathLike,
    real_dir: str | os.PathLike,
    weights: Weights = None,
    source_dir: str | os.PathLike | None = None,
    *,
    settings: KIDSettings = KIDSettings(),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """KID (subsets and blocks), FID and, with `source_dir` (the real images that were translated), mean KID of
    the images in `fake_dir` against those in `real_dir`; every image below each folder is used."""
    fake, real = _images_in(fake_dir), _images_in(real_dir)
    source = _images_in(source_dir) if source_dir is not None else None
    model = inception_model(weights)
    features_of = _feature_cache(model, batch_size, progress, device)
    return {
        "fake_dir": str(fake_dir),
        "real_dir": str(real_dir),
        "source_dir": None if source_dir is None else str(source_dir),
        **_evaluate_files(fake, real, source, model, settings, features_of),
    }


def _require_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} already exists and is not empty: give an empty or new output folder, so that exactly this "
            "checkpoint's translations are scored and no file is overwritten"
        )


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike,
    direction: str = "both",
    real_split: str = "test",
    weights: Weights = None,
    out_dir: str | os.PathLike | None = None,
    *,
    precision: str = "exact",
    fast_dtype: str = "auto",
    settings: KIDSettings = KIDSettings(),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Translate DATA/testA (A2B; DATA/testB for B2A) with the checkpoint and score the translations against the
    target domain's real images (DATA/testB, or DATA/trainB with real_split="train"); mean KID uses the
    translated source images. Translations go to `out_dir`/A2B (and /B2A), which must be new or empty, or to a
    temporary folder that is removed afterwards. `batch_size` is the Inception network's; the generators translate
    at `inference.default_batch_size`, with `precision` and `fast_dtype` as `inference.Translator` takes them."""
    directions = tuple(DIRECTIONS) if direction == "both" else (direction,)
    for name in directions:
        generator_name(name)
    if real_split not in REAL_SPLITS:
        raise ValueError(f"real_split={real_split!r} must be one of: {', '.join(REAL_SPLITS)}")
    check_precision(precision, fast_dtype)
    config = read_model_config(checkpoint)  # only the config: a bad checkpoint fails before anything slow
    root = Path(data_root)
    plan = {}
    for name in directions:  # every folder is checked before anything slow happens
        source_dir, real_dir = root / f"test{name[0]}", root / f"{real_split}{name[2]}"
        fake_dir = Path(out_dir) / name if out_dir is not None else None
        if fake_dir is not None:
            _require_empty(fake_dir)
        plan[name] = (source_dir, _images_in(source_dir), real_dir, _images_in(real_dir), fake_dir)
    model = inception_model(weights)
    features_of = _feature_cache(model, batch_size, progress, device)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ugatit-eval-") as tmp:
        for name, (source_dir, sources, real_dir, reals, fake_dir) in plan.items():
            translator = Translator.from_checkpoint(checkpoint, name, device, None, precision, fast_dtype)
            folder = fake_dir or Path(tmp) / name
            fakes = translate_files(translator, sources, folder, progress=progress)
            del translator  # a full generator is 1 GiB; the next direction builds its own
            results[name] = {
                "fake_dir": None if fake_dir is None else str(fake_dir),
                "real_dir": str(real_dir),
                "source_dir": str(source_dir),
                **_evaluate_files(fakes, reals, sources, model, settings, features_of),
            }
    return {
        "checkpoint": str(checkpoint),
        "data_root": str(data_root),
        "real_split": real_split,
        "translation": {
            "img_size": config.img_size,
            "keep_aspect": config.keep_aspect,
            "rule": "official test transform (resize to img_size), saved as 8-bit PNG",
            "precision": precision,
        },
        "config": to_dict(config),
        "directions": results,
    }


# ----------------------------------------------------------------------------------------------
# Reporting


def _pm(scores: dict[str, Any] | None, spread: str, scale: float = 100.0) -> str:
    if scores is None:
        return "-"
    text = f"{scores['mean'] * scale:.2f}"
    value = scores[spread]
    return text if value is None or math.isnan(value) else f"{text} ± {value * scale:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """A text table of a `evaluate_folders` or `evaluate_checkpoint` result: KID x 100 ± std x 100 (standard KID),
    the authors' block and mean KID x 100 ± standard error x 100, and FID."""
    rows = results["directions"] if "directions" in results else {Path(results["fake_dir"]).name: results}
    header = ["", "fake", "real", "KID x100", "KID x100 (blocks)", "mean KID x100", "FID"]
    lines = [header]
    for name, r in rows.items():
        lines.append(
            [
                name,
                str(r["n_fake"]),
                str(r["n_real"]),
                _pm(r["kid"], "std"),
                _pm(r["kid_blocks"], "stderr"),
                _pm(r["mean_kid"], "stderr"),
                f"{r['fid']:.2f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: a single block's standard error is written as null
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Write results as JSON atomically (a crash never leaves half a file)."""
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Training-time tracking


class KIDTracker:
    """KID x 100 of both directions on a fixed set of test images, for calling every N training steps.

    The first `n_images` files (sorted) of DATA/testA and DATA/testB are used every time, so values are comparable
    along a run; the real images' features and the generator inputs are computed once, on the first call. The
    generators run in eval mode and go back to their previous mode afterwards; no random number is drawn, so
    tracking does not change the training run.
    """

    def __init__(
        self, data_root: str | os.PathLike, weights: Weights = None, n_images: int = 100, batch_size: int = 32
    ) -> None:
        if n_images < 2:
            raise ValueError(f"n_images={n_images} must be at least 2")
        root = Path(data_root)
        self.paths = {domain: _images_in(root / f"test{domain}")[:n_images] for domain in "AB"}
        self.model = inception_model(weights)
        self.batch_size = batch_size
        self._real: dict[str, np.ndarray] = {}
        self._inputs: dict[tuple[int, bool, str], torch.Tensor] = {}

    def _source(self, domain: str, img_size: int, keep_aspect: bool) -> torch.Tensor:
        key = (img_size, keep_aspect, domain)
        if key not in self._inputs:
            images = parallel_map(load_rgb, self.paths[domain])
            self._inputs[key] = torch.stack([eval_transform(image, img_size, keep_aspect) for image in images])
        return self._inputs[key]

    def _fake_features(self, generator: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> np.ndarray:
        features = []
        step = default_batch_size(device)  # the generator's own batch; `batch_size` is Inception's
        with torch.inference_mode(), ieee_fp32():
            for start in range(0, len(inputs), self.batch_size):
                chunk = inputs[start : start + self.batch_size].to(device)
                fake = torch.cat([generator(chunk[i : i + step])[0].float() for i in range(0, len(chunk), step)])
                pixels = to_uint8(fake) / 255  # exactly what an 8-bit PNG holds
                features.append(_features(self.model, pixels))
        return np.concatenate(features)

    def __call__(self, trainer: Any) -> dict[str, float]:
        """`trainer` needs `.nets` (genA2B, genB2A) and `.model` (img_size, keep_aspect)."""
        config = trainer.model
        scores = {}
        for name, generator_key in DIRECTIONS.items():
            generator = trainer.nets[generator_key]
            device = next(generator.parameters()).device
            self.model.to(device).eval()
            target = name[2]
            if target not in self._real:
                self._real[target] = extract_features(self.paths[target], self.model, self.batch_size, False, device)
            was_training = generator.training
            generator.eval()
            try:
                fake = self._fake_features(
                    generator, self._source(name[0], config.img_size, config.keep_aspect), device
                )
            finally:
                generator.train(was_training)
            scores[f"kid_{name}"] = 100 * mmd2_unbiased(self._real[target], fake)
            scores[f"kid_blocks_{name}"] = 100 * kid_blocks(self._real[target], fake)[0]
        return scores
