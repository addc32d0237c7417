"""Nearest 2x upsampling, reflection pad 1 and a 3x3 convolution as one 2x2 convolution of the small map.

Each upsampling stage of the generators computes conv3x3(reflect_pad(upsample(x))). In the upsampled map every
pixel is repeated twice along each axis, so a 3-tap window sees only two distinct input rows (and columns): on even
output rows the taps (0 | 1, 2) land on input rows (i - 1 | i), on odd rows the taps (0, 1 | 2) land on (i | i + 1).
The reflection pad of the upsampled map equals the upsampled edge (replicate) pad of x, so the same holds at the
borders. Summing the taps that land on one pixel gives, for each of the four output phases (even or odd row, even or
odd column), a 2x2 filter applied to the edge-padded x: 16 products per 2 x 2 block of outputs and channel pair
instead of 36, and no upsampled map at all. The four phases run as one convolution with four times the output
channels over the (H + 1) x (W + 1) positions of the padded x, each phase reading its own H x W crop of it, and are
interleaved into the output. Exact in real arithmetic: the pairs of weights summed before the products round
differently, nothing else changes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .precision import layout_of

# _TAPS[phase][k, d] = 1 where tap d of the 3x3 filter lands on input offset k (0: the pixel above or left of the
# phase's two, 1: the other one) for outputs of that phase (0: even rows or columns, 1: odd ones).
_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def fits(weight: torch.Tensor, scale: float | None, padding: tuple[int, ...], stride: tuple[int, int]) -> bool:
    """Whether conv(pad(upsample(x))) is the stage this module computes: 2x nearest, pad 1, 3x3, stride 1."""
    return scale == 2 and tuple(padding) == (1, 1, 1, 1) and weight.shape[2:] == (3, 3) and tuple(stride) == (1, 1)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """_TAPS in the dtype the filters are summed in: fp32 at least, so that bf16 weights are rounded once."""
    return _taps_on(weight.device, torch.promote_types(weight.dtype, torch.float32))


@functools.cache
def _taps_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(_TAPS, dtype=dtype, device=device)


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """The four phases' 2x2 filters as one (4 C_out) x C_in x 2 x 2 weight, phase-major."""
    taps = _taps(weight)
    phases = torch.einsum("akd,ble,oide->aboikl", taps, taps, weight.to(taps.dtype))
    return phases.reshape(-1, weight.shape[1], 2, 2).to(weight.dtype).contiguous(memory_format=layout_of(weight))


def _phase_weight_grad(grad_phases: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    taps = _taps(weight)
    grad = grad_phases.to(taps.dtype).reshape(2, 2, *weight.shape[:2], 2, 2)
    return torch.einsum("akd,ble,aboikl->oide", taps, taps, grad).to(weight.dtype)


def _phase_pairs(phases: torch.Tensor, out: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(crop of `phases`, the output pixels it holds) for each phase: views, so that copies between them move the
    values in either direction."""
    height, width = out.shape[2] // 2, out.shape[3] // 2
    by_phase = phases.unflatten(1, (2, 2, out.shape[1]))
    interleaved = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))
    for a in (0, 1):
        for b in (0, 1):
            yield by_phase[:, a, b, :, a : a + height, b : b + width], interleaved[:, :, :, a, :, b]


def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(pad(upsample(x, 2), 1, reflect), weight) for a 3x3 weight, x and weight in one dtype."""
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _phase_weight(weight))
    batch, _, height, width = x.shape
    shape = (batch, weight.shape[0], 2 * height, 2 * width)
    out = torch.empty(shape, dtype=phases.dtype, device=x.device, memory_format=layout_of(phases))
    for crop, pixels in _phase_pairs(phases, out):
        pixels.copy_(crop)
    return out


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_weight: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of `forward` in x and in weight (None where not needed), from the output's gradient."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    phase_weight = _phase_weight(weight)
    batch, _, height, width = padded.shape
    layout = layout_of(grad) if grad.is_contiguous(memory_format=layout_of(grad)) else layout_of(x)
    grad = grad.contiguous(memory_format=layout)
    shape = (batch, phase_weight.shape[0], height - 1, width - 1)
    grad_phases = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
    for crop, pixels in _phase_pairs(grad_phases, grad):
        crop.copy_(pixels)
    grad_padded, grad_phase_weight, _ = torch.ops.aten.convolution_backward(
        grad_phases, padded, phase_weight, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1, (need_x, need_weight, False)
    )
    grad_x = torch.ops.aten.replication_pad2d_backward(grad_padded, x, [1, 1, 1, 1]) if need_x else None
    return grad_x, _phase_weight_grad(grad_phase_weight, weight) if need_weight else None
