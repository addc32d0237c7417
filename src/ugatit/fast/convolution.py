"""The fast path's reflection pads and generator convolutions.

Two savings that change no number:

* `lean_pad`: PyTorch's reflection pad keeps its whole input for the backward, which needs only the input's shape;
  in a training step that pinned the generators' residual-block inputs and upsampled maps, which nothing else keeps.
  It also keeps its input's dtype under autocast: CPU autocast lists reflection padding among its fp32 ops, so in a
  bf16 network every pad cast its input up, padded twice the bytes and left the next convolution a cast back down.
* `pad_conv`: conv(pad(x)), or conv(pad(upsample(x))), as one autograd node that keeps only x for the backward and
  recomputes the rest there (the library's layers keep the padded copy). Where x is a fused norm's rectified output
  (`norms.Rectified`), it keeps the norm's input and coefficients instead, which the norm keeps anyway, and
  recomputes x too: a conv, norm, ReLU layer then keeps one map for its backward instead of two.

And faster forms of the same function, which round differently:

* the upsampling stages (nearest 2x, pad 1, 3 x 3) as one 2 x 2 convolution of the small map with four times the
  outputs (`subpixel.py`), in training and inference, on every device: fewer than half the products, and no
  upsampled map;
* in fp32 on a CPU the other large 3 x 3 layers by Winograd (`winograd.py`), and in fp32 inference the RGB output
  layer (3 output channels) in NHWC, where oneDNN's kernel is much faster than its NCHW one.

docs/performance.md ("Where the memory of a step goes") has the activation memory each saving removes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import subpixel, winograd
from .norms import Rectified
from .precision import autocast_off, layout_of


def _unpad_grad(
    grad: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format, padding: tuple[int, ...]
) -> torch.Tensor:
    """The gradient of a reflection pad's input, in grad's dtype. The kernel reads only the shape and layout of
    its `self` argument: an uninitialised stand-in does."""
    like = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format)
    return torch.ops.aten.reflection_pad2d_backward(grad, like, list(padding))


class _ReflectionPad(torch.autograd.Function):
    # The library's kernels, so the library's numbers; only the input's shape is kept.

    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        ctx.padding = padding
        ctx.shape = x.shape
        ctx.memory_format = layout_of(x)
        return F.pad(x, padding, mode="reflect")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _unpad_grad(grad, ctx.shape, ctx.memory_format, ctx.padding), None


def lean_pad(pad: nn.ReflectionPad2d, x: torch.Tensor) -> torch.Tensor:
    """`pad(x)` in x's dtype whatever autocast says, keeping only x's shape for the backward."""
    with autocast_off(x):
        if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
            return _ReflectionPad.apply(x, pad.padding)
        return F.pad(x, pad.padding, mode="reflect")


class _PadConv(torch.autograd.Function):
    # The same kernels in the same dtypes as autocast's layers (x upsampled and padded in its own dtype, convolved
    # in `dtype`, its gradient back in its own dtype), so the same numbers; x is kept in `dtype`, which upsamples
    # and pads to the same values. The weight is kept as the parameter and cast again in the backward: a kept cast
    # would hold a second copy of every generator weight per pass until the G update's backward. A rectified x is
    # kept as its recipe (only where x is in `dtype` already: its recomputation is x itself).

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: tuple[int, ...],
        stride: tuple[int, int],
        dtype: torch.dtype,
        scale: float | None,
        recipe: Rectified | None,
    ) -> torch.Tensor:
        kept = x.to(dtype)
        ctx.stride, ctx.padding, ctx.scale, ctx.input_dtype, ctx.dtype = stride, padding, scale, x.dtype, dtype
        ctx.recipe = recipe is not None
        if recipe is None:
            ctx.save_for_backward(kept, weight)
        else:
            ctx.save_for_backward(weight, recipe.source, recipe.scale, recipe.shift)
        weight = weight.to(dtype)
        ctx.subpixel = subpixel.fits(weight, scale, padding, stride)
        if ctx.subpixel:
            return subpixel.forward(kept, weight)
        padded = F.pad(_upsampled(kept, scale), padding, mode="reflect")
        ctx.winograd = _winograd(padded, weight, stride)
        if ctx.winograd:
            return winograd.forward(padded, weight)
        return F.conv2d(padded, weight, None, stride)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.recipe:
            parameter, *recipe = ctx.saved_tensors
            kept = Rectified(*recipe).recompute()
        else:
            kept, parameter = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        weight = parameter.to(ctx.dtype)
        with autocast_off(grad):  # a backward run inside autocast would have its pads cast up
            if ctx.subpixel:
                grad_x, grad_weight = subpixel.backward(grad, kept, weight, need_x, need_weight)
            else:
                grad_x, grad_weight = _pad_conv_grads(ctx, grad, kept, weight, need_x, need_weight)
        grad_x = None if grad_x is None else grad_x.to(ctx.input_dtype)
        return grad_x, None if grad_weight is None else grad_weight.to(parameter.dtype), None, None, None, None, None


def _pad_conv_grads(
    ctx, grad: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, need_x: bool, need_weight: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`_PadConv`'s gradients in x and in its weight, with the upsampled and padded input recomputed."""
    unpadded = _upsampled(kept, ctx.scale)
    padded = F.pad(unpadded, ctx.padding, mode="reflect")
    if ctx.winograd:
        grad_padded, grad_weight = winograd.backward(grad, padded, weight, need_x, need_weight)
    else:
        grad_padded, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, padded, weight, None, ctx.stride, (0, 0), (1, 1), False, (0, 0), 1, (need_x, need_weight, False)
        )
    grad_x = None
    if need_x:
        shape = unpadded.shape
        grad_x = _unpad_grad(grad_padded.to(ctx.input_dtype), shape, layout_of(unpadded), ctx.padding)
        if ctx.scale:
            grad_x = torch.ops.aten.upsample_nearest2d_backward(grad_x, shape[2:], kept.shape, ctx.scale, ctx.scale)
    return grad_x, grad_weight


def _upsampled(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale else x


def _winograd(padded: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int]) -> bool:
    return weight.shape[2:] == (3, 3) and stride == (1, 1) and winograd.pays(padded, weight)


def _rgb_inference(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        conv.out_channels == 3
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for an already padded x: by Winograd where it pays, the RGB layer in NHWC in fp32 inference."""
    if _winograd(x, conv.weight, conv.stride):
        return winograd.conv3x3(x, conv.weight)
    if _rgb_inference(conv, x):
        layout = torch.channels_last
        x, weight = x.contiguous(memory_format=layout), conv.weight.contiguous(memory_format=layout)
        return F.conv2d(x, weight, None, conv.stride).contiguous()
    return nn.Conv2d.forward(conv, x)


def pad_conv(conv: nn.Conv2d, pad: nn.ReflectionPad2d, upsample: nn.Upsample | None, x: torch.Tensor) -> torch.Tensor:
    """conv(pad(x)), or conv(pad(upsample(x))): in training by `_PadConv`, else layer by layer with `_conv`."""
    scale = float(upsample.scale_factor) if upsample else None  # the module itself runs as a passthrough
    training = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    stage = subpixel.fits(conv.weight, scale, pad.padding, conv.stride)
    if (not training and not stage) or torch.compiler.is_compiling():
        return _conv(conv, lean_pad(pad, _upsampled(x, scale)))
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # convolve in the dtype autocast would have
        dtype = torch.get_autocast_dtype(x.device.type)
    with autocast_off(x):
        if not training:
            return subpixel.forward(x.to(dtype), conv.weight.to(dtype))
        recipe = Rectified.of(x) if x.dtype == dtype else None
        return _PadConv.apply(x, conv.weight, pad.padding, conv.stride, dtype, scale, recipe)
