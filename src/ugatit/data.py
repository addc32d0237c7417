"""Image data pipeline: loading, dataset checks, U-GAT-IT transforms, resumable sampling and loaders.

Design notes:

* Every random decision for a sample comes from its ``sample_seed`` (see :class:`EpochSampler`),
  so a sample's augmentation is a pure function of (image, sample_seed). Batches are therefore
  identical for any ``num_workers`` and resuming needs only the number of samples consumed.
* Files are opened by content, never by extension, and fully decoded when checked, so a dataset
  that passes :func:`scan_dataset` will not fail halfway through training.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import BatchSampler, DataLoader, Dataset

TRAIN_DIRS = ("trainA", "trainB")
TEST_DIRS = ("testA", "testB")
CROP_MARGIN = 30  # official U-GAT-IT: resize to img_size + 30, then random-crop img_size (Config.crop_margin)
LOAD_THREADS = min(8, os.cpu_count() or 1)  # threads that decode images: PIL releases the GIL while decoding
CACHE_LIMIT_BYTES = 2 * 1024**3  # cache="auto" keeps decoded images in RAM below this size

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_MASK63 = (1 << 63) - 1
T = TypeVar("T")
R = TypeVar("R")


class BadImageError(ValueError):
    """A file that cannot be used as a training image; ``reason`` is short and human readable."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DataError(ValueError):
    """The dataset as a whole is unusable. ``reports`` holds the scan results when there are some,
    so ``check-data`` can still list every bad file before printing the verdict."""

    def __init__(self, message: str, reports: dict[str, FolderReport] | None = None) -> None:
        super().__init__(message)
        self.reports = reports


# ----------------------------------------------------------------------------------------------
# Loading


_ORIENTATION = 0x0112  # the EXIF orientation tag


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into an 8-bit RGB image, upright per its EXIF orientation.

    Mode rule: alpha (RGBA, LA, PA, P or L/RGB with a transparency key) is composited over white;
    L and 1 are replicated to gray RGB; CMYK, YCbCr etc. use PIL's conversion; I;16* is scaled
    from 0..65535, I (32-bit) is scaled from 0..65535 when all values fit 16 bits (how 16-bit
    files decode) and from 0..2**31-1 otherwise, negatives clipped; F is clipped to 0..255.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "zero-byte file")
        with Image.open(path) as img:
            img.load()  # full decode now: truncated files must fail here, not inside training
            img = ImageOps.exif_transpose(img)
    except BadImageError:
        raise
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not an image (cannot identify image file)") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"too large: {e}") from e
    except OSError as e:
        if e.errno is None:  # PIL decode errors carry no errno; filesystem errors do
            raise BadImageError(path, f"truncated or corrupt: {e}") from e
        raise BadImageError(path, f"cannot read: {e.strerror}") from e
    except Exception as e:  # corrupt files make PIL raise almost anything (SyntaxError, struct.error, ...)
        raise BadImageError(path, f"truncated or corrupt: {e}") from e
    try:
        return _to_rgb(img)
    except ValueError as e:
        raise BadImageError(path, f"unsupported image mode {img.mode}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """An image already open, read as `load_rgb` reads a file (upright per its EXIF orientation, alpha over white,
    high bit depths scaled), so that a caller's PIL image and the same file give the same result."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _UINT16_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        scale = 1.0
    elif mode in _UINT16_MODES or arr.max(initial=0) <= 0xFFFF:
        scale = 255 / 0xFFFF
    else:
        scale = 255 / 0x7FFFFFFF
    return np.clip(np.rint(np.nan_to_num(arr.astype(np.float64) * scale)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Listing and scanning


@dataclass
class FolderReport:
    folder: Path
    good: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every non-hidden regular file below ``folder``, sorted by relative path (as path parts).

    Nothing is filtered by extension: scanning opens each file and decides.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: create it and put images in it")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(folder).parts)


def _problem(path: Path, min_size: int) -> str | None:
    try:
        w, h = load_rgb(path).size
    except BadImageError as e:
        return e.reason
    if min(w, h) < min_size:
        return f"too small: {w}x{h} < {min_size} px on the shorter side"
    return None


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`fn` over `items` on LOAD_THREADS threads, results in order: threads suffice, PIL releases the GIL while
    decoding."""
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        return list(pool.map(fn, items))


def scan_folder(folder: str | os.PathLike, min_size: int) -> FolderReport:
    """Fully decode every file under ``folder`` and split them into usable and bad ones."""
    paths = list_images(folder)
    report = FolderReport(Path(folder))
    for path, problem in zip(paths, parallel_map(partial(_problem, min_size=min_size), paths), strict=True):
        if problem is None:
            report.good.append(path)
        else:
            report.bad.append((path, problem))
    return report


def scan_dataset(root: str | os.PathLike, min_size: int, require_test: bool = False) -> dict[str, FolderReport]:
    """Scan ROOT/trainA, trainB and, when present (or required), testA, testB.

    Raises DataError for a missing root or required folder, a required folder without usable
    images, and a training folder with only one. Optional test folders that exist are reported
    but not judged: the caller decides whether an empty one matters.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist: it must contain trainA/ and trainB/")
    required = TRAIN_DIRS + (TEST_DIRS if require_test else ())
    for name in required:
        if not (root / name).is_dir():
            raise DataError(f"{root / name} is missing: create it and put domain {name[-1]} images in it")
    names = [name for name in TRAIN_DIRS + TEST_DIRS if (root / name).is_dir()]
    reports = {name: scan_folder(root / name, min_size) for name in names}
    for name in required:
        report = reports[name]
        if not report.good:
            bad = f" ({len(report.bad)} unusable files; run `ugatit check-data {root}`)" if report.bad else ""
            raise DataError(f"{report.folder} has no usable images{bad}: add images to it", reports)
        if len(report.good) == 1 and name in TRAIN_DIRS:
            raise DataError(
                f"{report.folder} has a single usable image: add more, a training domain needs at least 2",
                reports,
            )
    return reports


def format_report(reports: dict[str, FolderReport]) -> str:
    """Counts per folder, then every bad file with its reason (output of ``ugatit check-data``)."""
    lines = []
    for name, report in reports.items():
        lines.append(f"{name}: {len(report.good)} good, {len(report.bad)} bad  ({report.folder})")
        lines += [f"  {path.relative_to(report.folder)}: {reason}" for path, reason in report.bad]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Transforms (same operations, order and PIL resampling as the official torchvision pipeline)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CxHxW in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return x.float().div_(255).sub_(0.5).div_(0.5)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator values in [-1, 1] as 8-bit pixel values, rounded as an 8-bit image file stores them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_image(x: torch.Tensor) -> Image.Image:
    """CxHxW tensor in [-1, 1] (C = 3 or 1) -> 8-bit PIL image; values outside are clipped."""
    arr = to_uint8(x.detach().float().cpu())
    arr = arr.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _resize(img: Image.Image, size: int, keep_aspect: bool) -> Image.Image:
    """torchvision Resize: (size, size), or the shorter side to ``size`` with the long side truncated."""
    w, h = img.size
    if not keep_aspect:
        new = (size, size)
    elif w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def train_transform(
    img: Image.Image, img_size: int, rng: random.Random, keep_aspect: bool = False, margin: int = CROP_MARGIN
) -> torch.Tensor:
    """Official training augmentation: flip(p=0.5) -> resize to img_size + margin -> random crop img_size.

    The official margin is 30 px at any size: a 12 % zoom at 256 px but 2x at 32 px, where training then sees
    half-image crops that look nothing like the whole images it is used on. Small models want ~12 % of img_size.
    """
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = _resize(img, img_size + margin, keep_aspect)
    w, h = img.size
    top = rng.randint(0, h - img_size)
    left = rng.randint(0, w - img_size)
    return to_tensor(img.crop((left, top, left + img_size, top + img_size)))


def eval_transform(img: Image.Image, img_size: int, keep_aspect: bool = False) -> torch.Tensor:
    """Official test transform: resize to (img_size, img_size); keep_aspect: shorter side + center crop."""
    img = _resize(img, img_size, keep_aspect)
    w, h = img.size
    top, left = round((h - img_size) / 2), round((w - img_size) / 2)
    return to_tensor(img.crop((left, top, left + img_size, top + img_size)))


# ----------------------------------------------------------------------------------------------
# Dataset


class UnpairedImageDataset(Dataset):
    """One domain's images, indexed by ``(index, sample_seed)`` pairs from :class:`EpochSampler`.

    The cache holds full decoded images (uint8 HxWx3) so cached and uncached samples go through
    the very same transform and are bit-identical. Build it before the DataLoader forks its
    workers so they share the cache copy-on-write.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        img_size: int,
        augment: bool = True,
        keep_aspect: bool = False,
        cache: bool | Literal["auto"] = False,
        margin: int = CROP_MARGIN,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.img_size = img_size
        self.augment = augment
        self.keep_aspect = keep_aspect
        self.margin = margin
        if cache == "auto":
            cache = _decoded_bytes(self.paths) <= CACHE_LIMIT_BYTES
        self.images = parallel_map(lambda p: np.asarray(load_rgb(p)), self.paths) if cache else None

    @property
    def cached(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, sample_seed = item
        img = Image.fromarray(self.images[index]) if self.images is not None else load_rgb(self.paths[index])
        if self.augment:
            return train_transform(img, self.img_size, random.Random(sample_seed), self.keep_aspect, self.margin)
        return eval_transform(img, self.img_size, self.keep_aspect)


def _decoded_bytes(paths: Sequence[Path]) -> int:
    """RGB bytes after decoding, from the headers only (nothing is decoded)."""

    def nbytes(path: Path) -> int:
        with Image.open(path) as img:
            return img.width * img.height * 3

    return sum(parallel_map(nbytes, paths))


# ----------------------------------------------------------------------------------------------
# Sampling


def _seed_words(*words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(list(words))


class EpochSampler:
    """Infinite stream of ``(index, sample_seed)`` for one rank, a pure function of the position.

    All ranks share one global stream of slots: slot s is entry s % n of epoch s // n, a permutation of range(n)
    seeded by (seed, epoch), and its sample_seed comes from (seed, s). Rank r takes slots
    start + r, start + r + world_size, ... so at every step the ranks together see exactly the samples (and
    augmentations) that one process with world_size times the batch would see, and a run resumed with another
    world size continues the same global stream. ``start`` counts the samples consumed by all ranks together
    (step * batch_size * world_size). Give each domain its own seed, or domains A and B share their shuffling order.
    """

    def __init__(
        self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0, name: str = "dataset"
    ) -> None:
        if n < 1:
            raise DataError(f"no images in {name}")
        if world_size > n:
            raise DataError(f"more ranks than images in {name}: {world_size} ranks, {n} images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.start = start
        self._epoch: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng(_seed_words(self.seed, 0, epoch)).permutation(self.n))
        return self._epoch[1]

    def slot(self, draw: int) -> int:
        """The global slot of this rank's ``draw``-th sample (counted from ``start``)."""
        return self.start + draw * self.world_size + self.rank

    def at(self, slot: int) -> tuple[int, int]:
        """The ``(index, sample_seed)`` of a global slot."""
        epoch, offset = divmod(slot, self.n)
        state = _seed_words(self.seed, 1, slot).generate_state(1, np.uint64)[0]
        return int(self.permutation(epoch)[offset]), int(state) & _MASK63

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = 0
        while True:
            yield self.at(self.slot(draw))
            draw += 1


# ----------------------------------------------------------------------------------------------
# Loaders


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seed global RNGs per worker anyway, for any library code that uses them. Workers ignore Ctrl-C: the main
    process decides when to stop, after finishing its step and saving a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = int(_seed_words(seed, 2, rank, worker_id).generate_state(1, np.uint64)[0]) & _MASK63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def make_loader(
    dataset: UnpairedImageDataset,
    sampler: EpochSampler,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Infinite DataLoader of B x 3 x H x W batches: ``it = iter(loader); batch = next(it)``.

    Batches come back in sampler order whatever the worker scheduling, and the explicit
    generator keeps DataLoader from drawing its worker base seed from the global torch RNG.
    """
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=True),
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=partial(_seed_worker, sampler.seed, sampler.rank),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def infinite_batches(
    paths: Sequence[str | os.PathLike],
    img_size: int,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    *,
    augment: bool = True,
    keep_aspect: bool = False,
    margin: int = CROP_MARGIN,
    cache: bool | Literal["auto"] = "auto",
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    pin_memory: bool = False,
    name: str = "dataset",
) -> Iterator[torch.Tensor]:
    """One domain's training batches, forever; ``start`` = samples all ranks together already consumed."""
    dataset = UnpairedImageDataset(paths, img_size, augment, keep_aspect, cache, margin)
    sampler = EpochSampler(len(dataset), seed, rank, world_size, start, name)
    return iter(make_loader(dataset, sampler, batch_size, num_workers, pin_memory))
