"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for fp32 on CPUs.

Where the fast path computes in fp32 (CPUs without bf16 units), the generators' 3x3 convolutions are nearly all of
a training step, and oneDNN already runs them near the cores' fp32 peak: the only way to go faster is fewer
multiplications. F(4x4, 3x3) (Lavin & Gray 2016) computes each 4 x 4 output tile from a 6 x 6 input tile with 36
products per channel pair instead of 144: the input tiles and the filters are carried into a transformed domain,
multiplied there as 36 independent matrix products over the channels, and the result carried back. Its backward is
the same algebra transposed (grad input and grad weight are 36 matrix products each), so training gains too.

The transforms are exact in real arithmetic; in fp32 they add a rounding far inside the fast path's tolerance and
well under bf16's (tests/test_winograd.py holds them to it). The exact path never comes here.
"""

from __future__ import annotations

import functools
import itertools

import torch

# Interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray, section 4.2): Y = A^T [(G g G^T) * (B^T d B)] A.
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # fmt: skip
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # fmt: skip
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE = 4  # outputs per tile side; input tiles are TILE + 2 wide and overlap by 2


# Where F(4x4, 3x3) paid against oneDNN's direct fp32 kernels (docs/performance.md, "Winograd"): from 128 tiles and
# with enough channels. With fewer tiles, or few channels, the transforms, which cost in proportion to C_in + C_out,
# outweigh the products saved, in proportion to C_in * C_out.
MIN_TILES = 128
MIN_CHANNELS = 64  # C_in * C_out / (C_in + C_out): 128 for 256 -> 256, 85 for 256 -> 128, 43 for 128 -> 64


@functools.cache
def _transforms(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input, filter and output transforms as Kronecker products of the 1-D ones (36 x 36, 36 x 9, 16 x 36),
    rounded to `dtype` once from float64. The filters go through one 36 x 9 product, which was faster than two 1-D
    passes with a transposed copy between."""

    def kron(m: tuple) -> torch.Tensor:
        one = torch.tensor(m, dtype=torch.float64)
        return torch.kron(one, one).to(device, dtype)

    return kron(_BT), kron(_G), kron(_AT)


def pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `conv3x3(x, weight)` should replace the library's kernel: fp32 on a CPU outside autocast (bf16 units
    and GPUs have faster kernels of their own), outside torch.compile (which picks its own), and a layer large
    enough for the transforms to pay (MIN_TILES, MIN_CHANNELS)."""
    c_out, c_in = weight.shape[:2]
    th, tw = _tile_counts(x)
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and x.shape[0] * th * tw >= MIN_TILES
        and c_in * c_out >= MIN_CHANNELS * (c_in + c_out)
    )


def _tile_counts(x: torch.Tensor) -> tuple[int, int]:
    """Output tiles down and across for an unpadded-convolution input x (N, C, H + 2, W + 2)."""
    return -(-(x.shape[2] - 2) // TILE), -(-(x.shape[3] - 2) // TILE)


def _pad_to(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """t with zeros below and to the right up to height x width: outputs cut into whole tiles."""
    extra_h, extra_w = height - t.shape[2], width - t.shape[3]
    return torch.nn.functional.pad(t, (0, extra_w, 0, extra_h)) if extra_h or extra_w else t


def _input_tiles(x: torch.Tensor) -> torch.Tensor:
    """B^T d B for every 6 x 6 input tile of an unpadded-convolution input x (N, C, H + 2, W + 2): (36, C, N*T)."""
    n, c = x.shape[:2]
    th, tw = _tile_counts(x)
    x = _pad_to(x, TILE * th + 2, TILE * tw + 2)
    windows = x.unfold(2, TILE + 2, TILE).unfold(3, TILE + 2, TILE)  # N, C, th, tw, 6, 6
    # Gathered tile by tile, (C, N, th, tw) x 36, which reads x row by row; the product transposes it for free.
    d = windows.transpose(0, 1).reshape(-1, 36)
    kb, _, _ = _transforms(x.device, x.dtype)
    return (kb @ d.t()).view(36, c, n * th * tw)


def _filters(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T for every filter: (36, C_out, C_in)."""
    _, kg, _ = _transforms(weight.device, weight.dtype)
    c_out, c_in = weight.shape[:2]
    return (kg @ weight.reshape(-1, 9).t()).view(36, c_out, c_in)


def _filters_grad(du: torch.Tensor) -> torch.Tensor:
    """The transpose of `_filters`: (36, C_out, C_in) -> (C_out, C_in, 3, 3), G^T du G."""
    _, kg, _ = _transforms(du.device, du.dtype)
    c_out, c_in = du.shape[1:]
    return (kg.t() @ du.view(36, -1)).t().view(c_out, c_in, 3, 3)


def _output(m: torch.Tensor, n: int, th: int, tw: int, height: int, width: int) -> torch.Tensor:
    """A^T m A back to images: m (36, C_out, N*T) -> (N, C_out, height, width), the padding tiles cut off."""
    _, _, ka = _transforms(m.device, m.dtype)
    c_out = m.shape[1]
    y = (ka @ m.view(36, -1)).view(TILE, TILE, c_out, n, th, tw)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, c_out, TILE * th, TILE * tw)
    return y[:, :, :height, :width].contiguous()


def _output_grad(grad: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """The transpose of `_output`: the output gradient (N, C_out, H, W) to the transformed domain, (36, C_out, N*T)."""
    n, c_out = grad.shape[:2]
    grad = _pad_to(grad, TILE * th, TILE * tw)
    tiles = grad.view(n, c_out, th, TILE, tw, TILE).permute(3, 5, 1, 0, 2, 4).reshape(16, -1)
    _, _, ka = _transforms(grad.device, grad.dtype)
    return (ka.t() @ tiles).view(36, c_out, n * th * tw)


def _input_grad(dv: torch.Tensor, shape: torch.Size, th: int, tw: int) -> torch.Tensor:
    """The transpose of `_input_tiles`: transformed-domain gradients (36, C, N*T) summed back into the
    overlapping 6 x 6 input tiles, (N, C, H + 2, W + 2)."""
    n, c, height, width = shape
    kb, _, _ = _transforms(dv.device, dv.dtype)
    tiles = (kb.t() @ dv.view(36, -1)).view(6, 6, c, n, th, tw).permute(3, 2, 4, 0, 5, 1)  # N, C, th, 6, tw, 6
    grad = dv.new_zeros(n, c, TILE * (th + 1), TILE * (tw + 1))
    blocks = grad.view(n, c, th + 1, TILE, tw + 1, TILE)
    # Each 6-wide tile side is its own 4-wide block plus the first 2 rows (columns) of the next block.
    sides = ((0, slice(0, TILE)), (1, slice(TILE, TILE + 2)))
    for (down, rows), (across, cols) in itertools.product(sides, sides):
        part = tiles[:, :, :, rows, :, cols]
        blocks[:, :, down : down + th, : part.shape[3], across : across + tw, : part.shape[5]] += part
    return grad[:, :, :height, :width]


def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`conv2d(x, weight)` for a 3 x 3 filter, stride 1, no padding: NCHW-contiguous x and weight, no autograd."""
    m = torch.bmm(_filters(weight), _input_tiles(x))
    return _output(m, x.shape[0], *_tile_counts(x), x.shape[2] - 2, x.shape[3] - 2)


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool = True, need_weight: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of `forward(x, weight)` in x and weight given the output's; the input tiles and the filters
    are transformed again rather than kept from the forward: input tiles are 2.25x the input and transformed
    filters 4x the weight, and memory is scarcer than time."""
    th, tw = _tile_counts(x)
    dm = _output_grad(grad.contiguous(), th, tw)
    grad_x = _input_grad(torch.bmm(_filters(weight).transpose(1, 2), dm), x.shape, th, tw) if need_x else None
    grad_w = _filters_grad(torch.bmm(dm, _input_tiles(x).transpose(1, 2))) if need_weight else None
    return grad_x, grad_w


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return forward(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return backward(grad, *ctx.saved_tensors, *ctx.needs_input_grad)


def conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`conv2d(x, weight)` for a 3 x 3 filter, stride 1, no padding (pad x first), by F(4x4, 3x3); differentiable
    in x and weight, in any floating dtype (float64 for gradcheck). The result is NCHW-contiguous."""
    return _Conv3x3.apply(x.contiguous(), weight.contiguous())
