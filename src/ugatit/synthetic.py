"""A built-in pair of synthetic image domains with measurable translation quality.

Content is a single filled shape (circle, square or triangle); style is what differs:

* domain A: a plain WARM shape (red/orange/yellow) on a LIGHT, near-white background;
* domain B: a COOL shape (green/cyan/blue) textured with stripes or a checkerboard of two
  shades, on a DARK, near-black background.

Everything is generated from a ``numpy.random.Generator``, so a seed fixes the data set.
Because the true shape mask is known, a translation can be scored without a learned model:
``domain_score`` says whether an image looks like B, ``shape_mask`` recovers the shape, and
``evaluate_translation`` combines both into "did the style change" and "was the content kept".
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray

DOMAINS = ("A", "B")
SHAPES = ("circle", "square", "triangle")
MIN_SIZE = 16
MARKER = "synthetic.json"

_BORDER = 2  # width (px) of the frame that the metrics treat as background
_MARGIN = _BORDER + 1  # shapes stay this far from the image edge, so the frame is pure background
_MIN_CONTRAST = 0.1  # RGB distance (in units of 255) below which nothing counts as foreground
_MIN_FOREGROUND = 0.01  # fraction of pixels needed before the foreground colour is trusted
_DARK_WEIGHT = 10.0  # logit per unit of background darkness below mid-grey
_COOL_WEIGHT = 6.0  # logit per unit of foreground coolness


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random shape whose circumscribed circle (diameter 30-60% of ``size``) lies fully inside."""
    kind = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(0.3, 0.6) * size / 2
    cx, cy = rng.uniform(radius + _MARGIN, size - radius - _MARGIN, size=2)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    n = 4 if kind == "square" else 3
    angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(n) / n
    vx, vy = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    # Convex polygon with vertices in angular order: inside = same side of every edge.
    sides = [(vx[(k + 1) % n] - vx[k]) * (ys - vy[k]) - (vy[(k + 1) % n] - vy[k]) * (xs - vx[k]) >= 0 for k in range(n)]
    return np.logical_and.reduce(sides)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A boolean stripes-or-checker pattern selecting between the two cool shades."""
    ys, xs = np.mgrid[0:size, 0:size]
    cell = max(2, round(size * rng.uniform(0.04, 0.08)))
    if rng.random() < 0.5:
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi
        return (np.floor((xs * math.cos(angle) + ys * math.sin(angle)) / cell) % 2).astype(bool)
    return ((xs // cell + ys // cell) % 2).astype(bool)


def make_sample(domain: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """One image of ``domain`` and its boolean HxW shape mask (the content to preserve)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be 'A' or 'B', got {domain!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    mask = _shape_mask(rng, size)
    tint = rng.uniform(-0.03, 0.03, size=3)
    if domain == "A":
        background = (rng.uniform(0.90, 0.97) + tint) * 255.0
        foreground = np.broadcast_to(
            _hsv(rng.uniform(0.0, 0.15), rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0)), (size, size, 3)
        )
    else:
        background = (rng.uniform(0.04, 0.14) + tint) * 255.0
        hue = rng.uniform(0.36, 0.70)
        light = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.85, 1.0))
        dark = _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.55, 0.7))
        foreground = np.where(_texture(rng, size)[..., None], light, dark)
    pixels = np.where(mask[..., None], foreground, background)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB"), mask


def write_dataset(root: Path, size: int = 64, n_train: int = 200, n_test: int = 20, seed: int = 0) -> Path:
    """Write trainA/trainB/testA/testB PNGs and masks/testA, masks/testB under ``root``.

    The set is built in a sibling temporary directory and renamed into place, so ``root`` is
    either absent, empty, or complete with its ``synthetic.json`` marker. A non-empty ``root``
    is reused when its marker matches these parameters and refused otherwise, so a real data
    set is never overwritten.
    """
    root = Path(root)
    params = {
        "generator": "ugatit.synthetic",
        "version": 1,
        "size": size,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
    }
    if root.exists() and any(root.iterdir()):
        marker = root / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return root
        raise FileExistsError(f"{root} is not empty and was not written by write_dataset with {params}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split_index, (split, count) in enumerate((("train", n_train), ("test", n_test))):
            for domain_index, domain in enumerate(DOMAINS):
                rng = np.random.default_rng([seed, split_index, domain_index])
                image_dir = tmp / f"{split}{domain}"
                mask_dir = tmp / "masks" / f"{split}{domain}"
                image_dir.mkdir(parents=True)
                if split == "test":
                    mask_dir.mkdir(parents=True)
                for i in range(count):
                    image, mask = make_sample(domain, rng, size)
                    image.save(image_dir / f"{i:04d}.png")
                    if split == "test":
                        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_dir / f"{i:04d}.png")
        (tmp / MARKER).write_text(json.dumps(params, indent=2) + "\n")
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_mask(path: Path) -> np.ndarray:
    """Read a mask PNG written by ``write_dataset`` back into a boolean array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


def _as_rgb(img: ImageLike) -> np.ndarray:
    array = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (HxWx3), got shape {array.shape}")
    return array.astype(np.float64) / 255.0


def _background(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the outer frame: shapes never touch it, and the median ignores stray pixels."""
    b = _BORDER
    frame = np.concatenate(
        [
            rgb[:b].reshape(-1, 3),
            rgb[-b:].reshape(-1, 3),
            rgb[b:-b, :b].reshape(-1, 3),
            rgb[b:-b, -b:].reshape(-1, 3),
        ]
    )
    return np.median(frame, axis=0)


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Threshold maximising the between-class variance, so it adapts to low-contrast outputs."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[np.argmax(between[:-1]) + 1])


def _foreground(rgb: np.ndarray, fill_holes: bool) -> np.ndarray:
    distance = np.linalg.norm(rgb - _background(rgb), axis=2)
    mask = distance > max(_otsu(distance), _MIN_CONTRAST)
    if fill_holes:  # add pixels with >= 5 of 8 neighbours inside: closes texture gaps, never erodes
        padded = np.pad(mask, 1).astype(np.int8)
        h, w = mask.shape
        neighbours = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) - mask
        mask |= neighbours >= 5
    return mask


def shape_mask(img: ImageLike, domain: str) -> np.ndarray:
    """Segment the shape of an image assumed to be in ``domain``.

    Foreground = pixels whose RGB distance to the frame's median colour exceeds an Otsu
    threshold (never below 0.1*255, so a flat image has no foreground). Domain B shapes are
    textured, so there pixels with at least 5 of their 8 neighbours in the shape are added,
    which closes gaps left by a texture shade that drifted towards the background.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be 'A' or 'B', got {domain!r}")
    return _foreground(_as_rgb(img), fill_holes=domain == "B")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def domain_score(img: ImageLike) -> float:
    """Probability-like score in [0, 1] that ``img`` belongs to domain B.

    Two independent cues are each turned into a logit and summed, so either one alone decides
    when it is clear and, when they disagree, the stronger wins:

    * darkness: 10 * (0.5 - brightness of the frame's median colour), brightness in [0, 1]
      (A's light background gives about -4.5, B's dark one about +4);
    * coolness: 6 * mean over foreground pixels of ((G + B) / 2 - R) / 255, which is negative
      for reds/oranges/yellows and positive for greens/cyans/blues, and weighs each pixel by its
      chroma, so grey, washed-out outputs contribute little. With fewer than 1% foreground
      pixels (a flat image) this cue is 0.

    The foreground is the one ``shape_mask`` finds before hole filling, so no domain has to be
    assumed.
    """
    rgb = _as_rgb(img)
    darkness = 0.5 - float(_background(rgb).mean())
    foreground = _foreground(rgb, fill_holes=False)
    coolness = 0.0
    if foreground.mean() >= _MIN_FOREGROUND:
        r, g, b = rgb[foreground].T
        coolness = float(((g + b) / 2 - r).mean())
    logit = _DARK_WEIGHT * darkness + _COOL_WEIGHT * coolness
    return 1.0 / (1.0 + math.exp(-logit))


def classify_domain(img: ImageLike) -> str:
    """'B' when ``domain_score`` is at least 0.5, else 'A'."""
    return "B" if domain_score(img) >= 0.5 else "A"


def evaluate_translation(
    inputs: Sequence[ImageLike],
    outputs: Sequence[ImageLike],
    source_domain: str,
    target_domain: str,
    input_masks: Sequence[np.ndarray] | None = None,
) -> dict:
    """Score ``outputs[i]`` as the translation of ``inputs[i]`` from source to target domain.

    Returns ``target_domain_rate`` (fraction of outputs classified as the target domain: did
    the style change), ``mean_iou`` (mean IoU between the input's shape - the given mask, or
    segmented from the input - and the shape segmented from the output: was the content kept)
    and ``n``.
    """
    if len(inputs) != len(outputs) or len(inputs) == 0:
        raise ValueError(f"need equally many inputs and outputs, at least one; got {len(inputs)}, {len(outputs)}")
    if input_masks is not None and len(input_masks) != len(inputs):
        raise ValueError(f"got {len(input_masks)} masks for {len(inputs)} inputs")
    hits, ious = 0, []
    for i, (source, output) in enumerate(zip(inputs, outputs, strict=True)):
        truth = shape_mask(source, source_domain) if input_masks is None else input_masks[i]
        hits += classify_domain(output) == target_domain
        ious.append(mask_iou(truth, shape_mask(output, target_domain)))
    return {"target_domain_rate": hits / len(inputs), "mean_iou": float(np.mean(ious)), "n": len(inputs)}
