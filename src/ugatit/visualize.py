"""Sample grids and attention heatmaps as in the official U-GAT-IT code, without OpenCV.

The official code colours CAM heatmaps with ``cv2.applyColorMap(..., COLORMAP_JET)`` and
stacks, per sample, seven tiles vertically. Here the colormap is a hand-written jet and
everything stays RGB (the official BGR round trip only existed for ``cv2.imwrite``).

Conventions: images are float tensors 3xHxW in [-1, 1] (the generator's range); heatmaps are
raw CAM maps 1xhxw or hxw at any scale; tiles and columns are float tensors in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import atomic_write

# zlib level of the PNGs written here. Pillow's default (6) spends seconds on a photo-sized result for a file about a
# fifth smaller than level 1 makes, with the same pixels: writing would take longer than translating
# (docs/performance.md, "Photos").
PNG_LEVEL = 1


def jet_colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB (shape ``x.shape + (3,)``) with the classic jet ramp.

    Piecewise linear dark blue -> blue -> cyan -> yellow -> red -> dark red, the curve of
    OpenCV's COLORMAP_JET. Values outside [0, 1] are clipped and NaN counts as 0, so a broken
    heatmap still renders.
    """
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0), 0.0, 1.0)
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    rgb = np.clip(1.5 - np.abs(4.0 * (x[..., None] - centres)), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def heatmap_to_rgb(heatmap: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Colour a raw CAM heatmap as a 3xHxW float tensor in [0, 1] at image size ``size``.

    The map is min-max normalised, so only where the model attends matters, not the scale;
    a constant (or non-finite) map has no such information and becomes all zeros, i.e. the
    jet colour of 0, rather than NaN. It is then resized bilinearly (align_corners=False).
    """
    h, w = (size, size) if isinstance(size, int) else size
    x = heatmap.detach().to("cpu", torch.float32)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"heatmap must be 1xhxw or hxw, got shape {tuple(heatmap.shape)}")
    span = x.max() - x.min()
    if torch.isfinite(span) and span > 0:
        x = (x - x.min()) / span
    else:
        x = torch.zeros_like(x)
    x = F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return torch.from_numpy(jet_colormap(x.numpy())).permute(2, 0, 1).float() / 255.0


def _image_to_unit(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image or a 3xHxW tensor in [-1, 1] as a 3xHxW float tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)
    image = image.detach().to("cpu", torch.float32)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be 3xHxW, got shape {tuple(image.shape)}")
    return ((image + 1.0) / 2.0).clamp(0.0, 1.0)


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    """A 3xHxW float tensor in [0, 1] as an RGB PIL image."""
    array = (tensor.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def overlay_heatmap(image: Image.Image | torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend the coloured heatmap over ``image`` (weight ``alpha``) to show where the model looks."""
    base = _image_to_unit(image)
    colour = heatmap_to_rgb(heatmap, (base.shape[1], base.shape[2]))
    return _to_pil((1.0 - alpha) * base + alpha * colour)


def sample_column(
    real: torch.Tensor,
    identity: torch.Tensor,
    identity_heatmap: torch.Tensor,
    fake: torch.Tensor,
    fake_heatmap: torch.Tensor,
    cycle: torch.Tensor,
    cycle_heatmap: torch.Tensor,
) -> torch.Tensor:
    """One sample's tiles stacked vertically in the official order, as 3x(7H)xW in [0, 1].

    Order: real | identity heatmap | identity | translation heatmap | translation |
    cycle heatmap | cycle, each heatmap just above the image it explains.
    """
    real = _image_to_unit(real)
    size = (real.shape[1], real.shape[2])
    tiles = [
        real,
        heatmap_to_rgb(identity_heatmap, size),
        _image_to_unit(identity),
        heatmap_to_rgb(fake_heatmap, size),
        _image_to_unit(fake),
        heatmap_to_rgb(cycle_heatmap, size),
        _image_to_unit(cycle),
    ]
    return torch.cat(tiles, dim=1)


def make_grid(columns: list[torch.Tensor]) -> Image.Image:
    """Put sample columns (3xHxW in [0, 1], equal heights) side by side as one RGB image."""
    if not columns:
        raise ValueError("make_grid needs at least one column")
    return _to_pil(torch.cat(columns, dim=2))


def save_image(image: torch.Tensor | Image.Image, path: str | Path) -> None:
    """Write ``image`` (PIL, or 3xHxW tensor in [0, 1]) to ``path`` through `files.atomic_write`, so that a crash or
    a concurrent reader never sees a half-written image. The format follows the extension of ``path``; PNGs are
    written at `PNG_LEVEL`.
    """
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: not an image file extension that Pillow writes")
    pil = image if isinstance(image, Image.Image) else _to_pil(image)
    atomic_write(path, lambda tmp: pil.save(tmp, format=image_format, compress_level=PNG_LEVEL))
