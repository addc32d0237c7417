"""The U-GAT-IT networks: the ResNet generator with CAM attention and AdaILN, and the CAM discriminator.

Module and attribute names follow the official PyTorch code (`DownBlock`, `UpBlock1_1`, `UpBlock2`, `FC`, ...) so
that its checkpoints map onto ours key for key (see `official.py`). Every network returns
`(output, cam_logit, heatmap)`: cam_logit is the B x 2 auxiliary classifier output (global average and max pooling
branches), heatmap the channel sum of the attended feature map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import winograd
from .config import Config
from .norms import (
    ILN,
    AdaILN,
    InstanceNorm,
    autocast_off,
    eager,
    raw_weight,
    spectral_norm,
    spectral_parts,
    weight_matrix,
)


def class_activation(
    x: torch.Tensor,
    gap_fc: Callable[[torch.Tensor], torch.Tensor],
    gmp_fc: Callable[[torch.Tensor], torch.Tensor],
    gap_weight: torch.Tensor,
    gmp_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAM block: logits from pooled features, and the feature map re-weighted by each classifier's weight.

    Returns the concatenation of both re-weighted maps (2C channels) and the B x 2 logits. The operations run in
    the official order, which fixes the order in which autograd sums the gradients reaching `x`.
    """
    batch = x.shape[0]
    gap_logit = gap_fc(F.adaptive_avg_pool2d(x, 1).view(batch, -1))
    gap = x * gap_weight[:, :, None, None]
    gmp_logit = gmp_fc(F.adaptive_max_pool2d(x, 1).view(batch, -1))
    gmp = x * gmp_weight[:, :, None, None]
    return torch.cat([gap, gmp], 1), torch.cat([gap_logit, gmp_logit], 1)


class _ReflectionPad(torch.autograd.Function):
    # PyTorch's own reflection pad keeps its whole input for the backward, which needs only the input's shape: in
    # a training step that pinned the generators' residual-block inputs and upsampled maps, which nothing else
    # keeps (the fast 128 px G update saved 791 MiB of activations with PyTorch's pad, 683 MiB with this one).
    # Same kernels, so the same numbers.

    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        ctx.padding = padding
        ctx.shape = x.shape
        ctx.memory_format = _memory_format(x)
        return F.pad(x, padding, mode="reflect")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _unpad_grad(grad, ctx.shape, ctx.memory_format, ctx.padding), None


def _unpad_grad(
    grad: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format, padding: tuple[int, ...]
) -> torch.Tensor:
    """The gradient of a reflection pad's input, in grad's dtype. The kernel reads only the shape and layout of
    its `self` argument: an uninitialised stand-in does."""
    like = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format)
    return torch.ops.aten.reflection_pad2d_backward(grad, like, list(padding))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class ReflectionPad2d(nn.ReflectionPad2d):
    """`nn.ReflectionPad2d` that keeps its input's dtype under autocast and only its shape for the backward.

    CPU autocast lists reflection padding among its fp32 ops: in a bf16 network every pad then cast its input up,
    padded twice the bytes and left the next convolution a cast back down: about a quarter of the fast
    generator's inference time in a 256 px profile. Padding only moves values, so the fp32 detour changed no number.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x):
            if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
                return _ReflectionPad.apply(x, self.padding)
            return super().forward(x)


class Conv2d(nn.Conv2d):
    """The generator's convolutions: `nn.Conv2d` without bias or padding of its own (same parameters and keys).

    Built `fast`, the 3 x 3, stride 1 layers that pay go through Winograd's F(4x4, 3x3) (`winograd.py`): fp32 on
    a CPU, where they are most of a training step and the direct kernels already run at the cores' peak; and in
    training the reflection pad before each one is taken into the convolution (`pad_conv`). In fp32 inference on a
    CPU the RGB output layer (3 output channels) runs in NHWC (`forward`). Everywhere else, and always on the exact
    path, it is the library's convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, fast: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, bias=False)
        self.fast = fast

    def winograd(self, x: torch.Tensor) -> bool:
        """Whether this layer computes its (padded) input x by Winograd."""
        return self.fast and self.kernel_size == (3, 3) and self.stride == (1, 1) and winograd.pays(x, self.weight)

    def _rgb_inference(self, x: torch.Tensor) -> bool:
        return (
            self.fast
            and self.out_channels == 3
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd(x):
            return winograd.conv3x3(x, self.weight)
        if self._rgb_inference(x):
            # oneDNN's NCHW fp32 kernel ran this 64 -> 3 channel 7 x 7 layer at a seventh of the cores' peak, its
            # NHWC kernel twice as fast, layout changes included (forward only: forward + backward gained ~10 %).
            layout = torch.channels_last
            x, weight = x.contiguous(memory_format=layout), self.weight.contiguous(memory_format=layout)
            return F.conv2d(x, weight, None, self.stride).contiguous()
        return super().forward(x)


class _PadConv(torch.autograd.Function):
    # conv(reflection_pad(x)), or conv(reflection_pad(upsample(x))) with nearest upsampling by `scale`, that keeps
    # only x for the backward and recomputes the rest there. The library's layers keep the padded copy (the
    # convolution's input) and the pad its input, while x is most often kept anyway, by the ReLU before it, and is
    # a quarter of an upsampled map: the fast 128 px G update saves 477 MiB of activations instead of 683 MiB.
    # The same kernels in the same dtypes as autocast's layers (x upsampled and padded in its own dtype,
    # convolved in `dtype`, its gradient back in its own dtype), so the same numbers; x is kept in `dtype`,
    # which upsamples and pads to the same values.

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: tuple[int, ...],
        conv: Conv2d,
        dtype: torch.dtype,
        scale: float | None,
    ) -> torch.Tensor:
        kept = x.to(dtype)
        padded = F.pad(_upsampled(kept, scale), padding, mode="reflect")
        ctx.winograd = conv.winograd(padded)
        ctx.stride, ctx.padding, ctx.scale, ctx.input_dtype = conv.stride, padding, scale, x.dtype
        ctx.save_for_backward(kept, weight)
        if ctx.winograd:
            return winograd.forward(padded, weight)
        return F.conv2d(padded, weight, None, conv.stride)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        kept, weight = ctx.saved_tensors
        unpadded = _upsampled(kept, ctx.scale)
        padded = F.pad(unpadded, ctx.padding, mode="reflect")
        need_x, need_weight = ctx.needs_input_grad[:2]
        if ctx.winograd:
            grad_padded, grad_weight = winograd.backward(grad, padded, weight, need_x, need_weight)
        else:
            grad_padded, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, padded, weight, None, ctx.stride, (0, 0), (1, 1), False, (0, 0), 1, (need_x, need_weight, False)
            )
        grad_x = None
        if need_x:
            shape = unpadded.shape
            grad_x = _unpad_grad(grad_padded.to(ctx.input_dtype), shape, _memory_format(unpadded), ctx.padding)
            if ctx.scale:
                grad_x = torch.ops.aten.upsample_nearest2d_backward(grad_x, shape[2:], kept.shape, ctx.scale, ctx.scale)
        return grad_x, grad_weight, None, None, None, None


def _upsampled(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale else x


def pad_conv(
    pad: ReflectionPad2d, conv: nn.Module, x: torch.Tensor, upsample: nn.Upsample | None = None
) -> torch.Tensor:
    """conv(pad(x)), or conv(pad(upsample(x))); for a fast `Conv2d` in training, by `_PadConv`."""
    training = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    if not (isinstance(conv, Conv2d) and conv.fast and training and not torch.compiler.is_compiling()):
        return conv(pad(upsample(x) if upsample else x))
    weight, dtype = conv.weight, x.dtype
    if torch.is_autocast_enabled(x.device.type):  # convolve in the dtype autocast would have
        dtype = torch.get_autocast_dtype(x.device.type)
        weight = weight.to(dtype)
    scale = float(upsample.scale_factor) if upsample else None
    with autocast_off(x):
        return _PadConv.apply(x, weight, pad.padding, conv, dtype, scale)


class Layers(nn.Sequential):
    """`nn.Sequential` that runs each reflection pad together with the convolution after it, and the nearest
    upsampling before it if any (`pad_conv`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            upsample = layers[i] if isinstance(layers[i], nn.Upsample) and layers[i].mode == "nearest" else None
            pad = i + (upsample is not None)
            if pad + 1 < len(layers) and isinstance(layers[pad], ReflectionPad2d):
                x = pad_conv(layers[pad], layers[pad + 1], x, upsample)
                i = pad + 2
            else:
                x = layers[i](x)
                i += 1
        return x


def _checkpointed(segments: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run segments one after another, storing only their inputs (segments must not start with an in-place op)."""
    for segment in segments:
        x = checkpoint(segment, x, use_reentrant=False)
    return x


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, fast: bool = False):
        super().__init__()
        self.conv_block = Layers(
            ReflectionPad2d(1),
            Conv2d(dim, dim, 3, 1, fast),
            InstanceNorm(fast),
            nn.ReLU(True),
            ReflectionPad2d(1),
            Conv2d(dim, dim, 3, 1, fast),
            InstanceNorm(fast),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetAdaILNBlock(nn.Module):
    def __init__(self, dim: int, fast: bool = False):
        super().__init__()
        self.pad1 = ReflectionPad2d(1)
        self.conv1 = Conv2d(dim, dim, 3, 1, fast)
        self.norm1 = AdaILN(dim, fused=fast)
        self.relu1 = nn.ReLU(True)
        self.pad2 = ReflectionPad2d(1)
        self.conv2 = Conv2d(dim, dim, 3, 1, fast)
        self.norm2 = AdaILN(dim, fused=fast)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(pad_conv(self.pad1, self.conv1, x), gamma, beta))
        out = self.norm2(pad_conv(self.pad2, self.conv2, out), gamma, beta)
        return out + x


class ResnetGenerator(nn.Module):
    """Encoder, CAM, gamma/beta MLP, AdaILN residual decoder and upsampling (UGATIT_SPEC.md section 1.1).

    In full mode the MLP reads the whole flattened bottleneck, which binds the network to `img_size`; light mode
    pools it first and runs at any size that is a multiple of 4. `fast` selects the fused normalisation kernels and
    Winograd convolutions where they pay (`Conv2d`); `grad_checkpoint` recomputes block insides in the backward
    instead of storing them. Neither changes the weights.
    """

    def __init__(
        self,
        ch: int = 64,
        n_res: int = 4,
        img_size: int = 256,
        light: bool = False,
        *,
        fast: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        self.light = light
        self.n_res = n_res
        self.grad_checkpoint = grad_checkpoint
        dim = ch * 4
        down = [
            ReflectionPad2d(3),
            Conv2d(3, ch, 7, 1, fast),
            InstanceNorm(fast),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            down += [
                ReflectionPad2d(1),
                Conv2d(ch * mult, ch * mult * 2, 3, 2, fast),
                InstanceNorm(fast),
                nn.ReLU(True),
            ]
        down += [ResnetBlock(dim, fast) for _ in range(n_res)]

        self.gap_fc = nn.Linear(dim, 1, bias=False)
        self.gmp_fc = nn.Linear(dim, 1, bias=False)
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.relu = nn.ReLU(True)
        mlp_in = dim if light else (img_size // 4) ** 2 * dim
        self.gamma = nn.Linear(dim, dim, bias=False)
        self.beta = nn.Linear(dim, dim, bias=False)
        for i in range(n_res):
            setattr(self, f"UpBlock1_{i + 1}", ResnetAdaILNBlock(dim, fast))

        up = []
        for i in range(2):
            mult = 2 ** (2 - i)
            up += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                ReflectionPad2d(1),
                Conv2d(ch * mult, ch * mult // 2, 3, 1, fast),
                ILN(ch * mult // 2, fused=fast),
                nn.ReLU(True),
            ]
        up += [ReflectionPad2d(3), Conv2d(ch, 3, 7, 1, fast), nn.Tanh()]

        # Registered last, as in the official code, so that state_dict() lists keys in the official order.
        self.DownBlock = Layers(*down)
        self.FC = nn.Sequential(
            nn.Linear(mlp_in, dim, bias=False), nn.ReLU(True), nn.Linear(dim, dim, bias=False), nn.ReLU(True)
        )
        self.UpBlock2 = Layers(*up)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        checkpointing = self.grad_checkpoint and torch.is_grad_enabled()
        if checkpointing:  # keep only block boundaries; recompute the insides during backward
            x = _checkpointed([self.DownBlock[:12], *self.DownBlock[12:]], x)
        else:
            x = self.DownBlock(x)
        x, cam_logit = class_activation(x, self.gap_fc, self.gmp_fc, self.gap_fc.weight, self.gmp_fc.weight)
        x = self.relu(self.conv1x1(x))
        heatmap = torch.sum(x, dim=1, keepdim=True)

        style = F.adaptive_avg_pool2d(x, 1) if self.light else x
        style = self.FC(style.reshape(x.shape[0], -1))
        gamma, beta = self.gamma(style), self.beta(style)
        for i in range(self.n_res):
            block = getattr(self, f"UpBlock1_{i + 1}")
            x = checkpoint(block, x, gamma, beta, use_reentrant=False) if checkpointing else block(x, gamma, beta)
        if checkpointing:
            return _checkpointed([self.UpBlock2[:5], self.UpBlock2[5:10], self.UpBlock2[10:]], x), cam_logit, heatmap
        return self.UpBlock2(x), cam_logit, heatmap


def _windows(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """The input windows of an unpadded convolution as rows, in the column order of `weight_matrix(weight)`."""
    kh, kw = weight.shape[2:]
    windows = x.permute(0, 2, 3, 1).unfold(1, kh, stride).unfold(2, kw, stride)  # B, Ho, Wo, C, kh, kw
    if not weight.is_contiguous():  # channels_last weight: columns in (kh, kw, C) order
        windows = windows.permute(0, 1, 2, 4, 5, 3)
    return windows.reshape(-1, windows[0, 0, 0].numel())


def _per_call(sigmas: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each call's sigma repeated over its share of y's batch, shaped to divide y and in y's dtype (an fp32 divisor
    would promote bf16 activations to fp32)."""
    divisor = sigmas.repeat_interleave(y.shape[0] // sigmas.numel()).to(y.dtype)
    return divisor.view(-1, *([1] * (y.dim() - 1)))


@eager  # memory-bound: nothing for a compiler to fuse, and per-layer shapes would recompile it
def _fast_conv(conv: nn.Conv2d, x: torch.Tensor, calls: int = 1) -> torch.Tensor:
    """conv(x, W / sigma) + b computed as conv(x, W) / sigma + b, as a matrix product when the output is small.

    The discriminators' deep layers are memory-bound: at 128 px the global one's 2048 x 1024 x 4 x 4 conv has
    3 x 3 outputs. Dividing the output instead of the weight, and one fp32 product with the power iteration fused
    in (`SpectralNorm.matmul`), read and write the weight fewer times; the CPU convolution kernels (bf16,
    channels_last) were 1.5-4.5x slower than this fp32 product on these shapes, forward + backward. Larger outputs
    go to the convolution kernels. x holds `calls` consecutive calls (see `Discriminator.forward`).
    """
    spectral = spectral_parts(conv)
    weight = spectral[1] if spectral else conv.weight
    stride = conv.stride[0]
    batch, _, height, width = x.shape
    out_h, out_w = (height - weight.shape[2]) // stride + 1, (width - weight.shape[3]) // stride + 1
    plain = conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.stride == (stride,) * 2
    dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
    if plain and dense and batch * out_h * out_w <= weight.shape[0]:
        cols = _windows(x, weight, stride)
        with autocast_off(x):
            if spectral:
                y = spectral[0].matmul(cols, weight, calls)
            else:
                y = (weight_matrix(weight)[0] @ cols.float().t()).t()
        y = y.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2)
    else:
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        if spectral:
            y = y / _per_call(spectral[0].sigma(weight, calls), y)
    return y if conv.bias is None else y + conv.bias.to(y.dtype)[:, None, None]  # bf16 stays bf16


def _fast_linear(linear: nn.Linear, x: torch.Tensor, calls: int = 1) -> torch.Tensor:
    """The spectral-normalised CAM classifier as x W^T / sigma, with one power iteration per call in x."""
    spectral = spectral_parts(linear)
    if not spectral:
        return linear(x)
    y = F.linear(x, spectral[1])
    return y / _per_call(spectral[0].sigma(spectral[1], calls), y)


class Discriminator(nn.Module):
    """PatchGAN discriminator with spectral norm and its own CAM (UGATIT_SPEC.md section 1.2).

    `n_layers - 2` stride-2 convs, one stride-1 conv, the CAM, and a final 4x4 conv to patch logits. The official
    global discriminator has 7 layers (286 px receptive field), the local one 5 (70 px). `fast` computes the same
    function faster (`_fast_conv`).
    """

    def __init__(self, ch: int = 64, n_layers: int = 5, *, fast: bool = False):
        super().__init__()
        self.fast = fast
        layers = [
            ReflectionPad2d(1),
            spectral_norm(nn.Conv2d(3, ch, 4, 2, 0, bias=True)),
            nn.LeakyReLU(0.2, True),
        ]
        for i in range(1, n_layers - 2):
            mult = 2 ** (i - 1)
            layers += [
                ReflectionPad2d(1),
                spectral_norm(nn.Conv2d(ch * mult, ch * mult * 2, 4, 2, 0, bias=True)),
                nn.LeakyReLU(0.2, True),
            ]
        mult = 2 ** (n_layers - 3)
        layers += [
            ReflectionPad2d(1),
            spectral_norm(nn.Conv2d(ch * mult, ch * mult * 2, 4, 1, 0, bias=True)),
            nn.LeakyReLU(0.2, True),
        ]
        dim = ch * mult * 2
        self.gap_fc = spectral_norm(nn.Linear(dim, 1, bias=False))
        self.gmp_fc = spectral_norm(nn.Linear(dim, 1, bias=False))
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.leaky_relu = nn.LeakyReLU(0.2, True)
        self.pad = ReflectionPad2d(1)
        self.conv = spectral_norm(nn.Conv2d(dim, 1, 4, 1, 0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, calls: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`calls` > 1 (fast only): x stacks that many equal batches, and the result is that of as many
        consecutive calls, each advancing the spectral norms' power iterations once. The D update scores the real
        and the fake batch in one call this way: one pass over the weights and one gradient for both."""
        if calls < 1 or (calls > 1 and not self.fast):
            raise ValueError(f"calls={calls}: must be 1, or more on a fast discriminator")
        if x.shape[0] % calls:
            raise ValueError(f"batch of {x.shape[0]} does not split into {calls} calls")
        conv = functools.partial(_fast_conv, calls=calls) if self.fast else lambda layer, y: layer(y)
        for layer in self.model:
            x = conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
        # The official code re-weights with the un-normalised weight (`weight_orig`), not W / sigma.
        gap_fc, gmp_fc = self.gap_fc, self.gmp_fc
        if self.fast:
            gap_fc, gmp_fc = (functools.partial(_fast_linear, fc, calls=calls) for fc in (gap_fc, gmp_fc))
        x, cam_logit = class_activation(x, gap_fc, gmp_fc, raw_weight(self.gap_fc), raw_weight(self.gmp_fc))
        x = self.leaky_relu(conv(self.conv1x1, x))
        heatmap = torch.sum(x, dim=1, keepdim=True)
        return conv(self.conv, self.pad(x)), cam_logit, heatmap


GENERATORS = ("genA2B", "genB2A")
DISCRIMINATORS = ("disGA", "disGB", "disLA", "disLB")
NETWORKS = GENERATORS + DISCRIMINATORS


def build_generator(config: Config) -> ResnetGenerator:
    return ResnetGenerator(
        config.ch,
        config.n_res,
        config.img_size,
        config.light,
        fast=config.fast,
        grad_checkpoint=config.grad_checkpoint,
    )


def build_networks(config: Config) -> dict[str, nn.Module]:
    """The six networks, keyed by their official names; disG* judge globally, disL* locally."""
    nets: dict[str, nn.Module] = {name: build_generator(config) for name in GENERATORS}
    for domain in "AB":
        nets[f"disG{domain}"] = Discriminator(config.ch, config.global_layers, fast=config.fast)
        nets[f"disL{domain}"] = Discriminator(config.ch, config.local_layers, fast=config.fast)
    return {name: nets[name] for name in NETWORKS}
