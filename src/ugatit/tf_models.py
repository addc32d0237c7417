"""The U-GAT-IT networks as the official TensorFlow code computes them (docs/spec.md section 6), which the
authors' released checkpoints need (`ugatit import-tf`, `tf_import.py`).

The outline is that of `models.py` (encoder, CAM, MLP, AdaILN decoder; CAM discriminators with spectral norm), but
the TF graph differs in a dozen places, each of which visibly changes a released model's images: a bias on every
convolution, affine instance norms in the encoder, biased variances, rho smoothing, one shared CAM classifier with
a bias, reflection pads that are asymmetric where kernel - stride is odd, and a spectral norm that runs one power
iteration from the stored u at every call. Modules are named after the TF variable scopes (`conv_0`,
`resblock_0.res1.conv_0`, `MLP.linear_0`, `CAM_logit`, ...), so a parameter's key is its TF variable's name.
Tensors are NCHW and weights are in PyTorch layout; `tf_import.py` converts TF's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import EPS, eager, instance_layer_norm

TF_INIT_STD = 0.02  # every TF kernel starts from N(0, 0.02), every bias from 0


def tf_padding(kernel: int, stride: int, pad: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) of the TF code's reflection pad: `pad` on each side when kernel - stride is even,
    else `pad` before and `kernel - stride - pad` after (a 3x3 stride-2 conv pads (1, 0), a 4x4 stride-1 (1, 2))."""
    after = pad if (kernel - stride) % 2 == 0 else kernel - stride - pad
    return (pad, after, pad, after)


class Conv(nn.Conv2d):
    """The TF code's `conv`: a reflection pad as `tf_padding` says, then an unpadded convolution with a bias."""

    tf_scope = "conv2d"  # the TF sub-scope of its kernel and bias (tf.layers.conv2d)

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, pad: int = 0):
        super().__init__(in_ch, out_ch, kernel, stride, 0, bias=True)
        self.pad = nn.ReflectionPad2d(tf_padding(kernel, stride, pad)) if pad else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.pad(x), self.weight, self.bias)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(torch.clamp(torch.sum(x * x), min=1e-12))  # tf.nn.l2_normalize


@eager  # the in-place update of u must run as written, also under torch.compile
def spectral_normalized(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """W / sigma after one power iteration from u, which stores the new u: TF's `spectral_norm`, at every call,
    training or not. Differentiable in W with u and v held, in fp32 whatever autocast says."""
    with torch.autocast(weight.device.type, enabled=False):
        matrix = weight.flatten(1)
        with torch.no_grad():
            v = _l2_normalize(torch.mv(matrix.t(), u))
            u_next = _l2_normalize(torch.mv(matrix, v))
            u.copy_(u_next)
        return weight / torch.dot(u_next, torch.mv(matrix, v))


class SpectralConv(Conv):
    """`conv` with sn=True: the kernel normalised by `spectral_normalized`, its u vector stored beside it."""

    tf_scope = ""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, pad: int = 0):
        super().__init__(in_ch, out_ch, kernel, stride, pad)
        self.register_buffer("u", torch.randn(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.pad(x), spectral_normalized(self.weight, self.u), self.bias)


class Dense(nn.Linear):
    """`fully_connected`: a linear layer with a bias (tf.layers.dense)."""

    tf_scope = "dense"


class SpectralLinear(nn.Linear):
    """The discriminators' CAM classifier (`fully_connected_with_w` with sn=True): one output, a bias, a u."""

    def __init__(self, in_features: int):
        super().__init__(in_features, 1)
        self.register_buffer("u", torch.randn(1))


CORRECTION = 0  # the variances of ILN and AdaLIN are biased, as tf.nn.moments computes them


class InstanceNorm(nn.Module):
    """`instance_norm`: affine, biased variance, eps 1e-5."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.gamma, bias=self.beta, eps=EPS)


class AdaLIN(nn.Module):
    """`adaptive_instance_layer_norm`: biased variances; rho starts at 1, and with smoothing the rho used is
    clip(rho - 0.1, 0, 1)."""

    def __init__(self, channels: int, smoothing: bool):
        super().__init__()
        self.smoothing = smoothing
        self.rho = nn.Parameter(torch.ones(channels))

    def mixing_ratio(self) -> torch.Tensor:
        """The rho the layer uses: smoothed, or as stored."""
        return torch.clamp(self.rho - 0.1, 0.0, 1.0) if self.smoothing else self.rho

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        rho = self.mixing_ratio()[:, None, None]
        return instance_layer_norm(x, rho, gamma[:, :, None, None], beta[:, :, None, None], EPS, CORRECTION)


class LayerInstanceNorm(nn.Module):
    """`layer_instance_norm` of the upsampling stages: biased variances, rho used as stored (starts at 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.rho = nn.Parameter(torch.zeros(channels))
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = (p[:, None, None] for p in (self.rho, self.gamma, self.beta))
        return instance_layer_norm(x, *per_channel, EPS, CORRECTION)


def _unit(dim: int, norm_name: str, norm: nn.Module) -> nn.Module:
    """A `res1` / `res2` scope: conv_0 (3x3, pad 1) and its norm."""
    unit = nn.Module()
    unit.conv_0 = Conv(dim, dim, 3, 1, 1)
    unit.add_module(norm_name, norm)
    return unit


class ResBlock(nn.Module):
    """`resblock`: (conv, IN, ReLU, conv, IN) plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.res1 = _unit(dim, "instance_norm", InstanceNorm(dim))
        self.res2 = _unit(dim, "instance_norm", InstanceNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.res1.instance_norm(self.res1.conv_0(x)))
        return x + self.res2.instance_norm(self.res2.conv_0(out))


class AdaptiveResBlock(nn.Module):
    """`adaptive_ins_layer_resblock`: (conv, AdaLIN, ReLU, conv, AdaLIN) plus the input."""

    def __init__(self, dim: int, smoothing: bool):
        super().__init__()
        self.res1 = _unit(dim, "instance_layer_norm", AdaLIN(dim, smoothing))
        self.res2 = _unit(dim, "instance_layer_norm", AdaLIN(dim, smoothing))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.res1.instance_layer_norm(self.res1.conv_0(x), gamma, beta))
        return x + self.res2.instance_layer_norm(self.res2.conv_0(out), gamma, beta)


class MLP(nn.Module):
    """gamma and beta of the AdaLINs: linear_0, ReLU, linear_1, ReLU, then the two heads (no activation)."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.linear_0 = Dense(in_features, width)
        self.linear_1 = Dense(width, width)
        self.gamma = Dense(width, width)
        self.beta = Dense(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.linear_1(F.relu(self.linear_0(x))))
        return self.gamma(x), self.beta(x)


def shared_class_activation(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv_1x1: nn.Module, activation: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TF CAM block: one classifier (weight 1 x C, bias) gives both logits, of the average- and max-pooled
    features, and both halves fed to conv_1x1 are the map re-weighted by weight + bias, so they are equal."""
    gap_logit = F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), weight, bias)
    gmp_logit = F.linear(F.adaptive_max_pool2d(x, 1).flatten(1), weight, bias)
    weighted = x * (weight[0] + bias)[None, :, None, None]
    x = activation(conv_1x1(torch.cat([weighted, weighted], 1)))
    return x, torch.cat([gap_logit, gmp_logit], 1), torch.sum(x, dim=1, keepdim=True)


def _init_tf(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, TF_INIT_STD)
            nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """`generator`: 7x7 conv, two stride-2 convs (affine IN, ReLU), residual blocks, the CAM, the MLP, adaptive
    residual blocks, two (nearest x2 upsampling, 3x3 conv, LIN, ReLU) stages, the 7x7 conv to RGB and tanh.

    Full mode flattens the bottleneck into the MLP (this module flattens C, H, W, with the weight reordered on
    import), which binds the network to `img_size`; light mode pools it first.
    """

    def __init__(self, ch: int = 64, n_res: int = 4, img_size: int = 256, light: bool = False, smoothing: bool = True):
        super().__init__()
        self.light, self.n_res = light, n_res
        dim = ch * 4
        self.conv = Conv(3, ch, 7, 1, 3)
        self.ins_norm = InstanceNorm(ch)
        for i in range(2):
            setattr(self, f"conv_{i}", Conv(ch * 2**i, ch * 2 ** (i + 1), 3, 2, 1))
            setattr(self, f"ins_norm_{i}", InstanceNorm(ch * 2 ** (i + 1)))
        for i in range(n_res):
            setattr(self, f"resblock_{i}", ResBlock(dim))
        self.CAM_logit = nn.Linear(dim, 1)
        self.conv_1x1 = Conv(dim * 2, dim, 1)
        self.MLP = MLP(dim if light else (img_size // 4) ** 2 * dim, dim)
        for i in range(n_res):
            setattr(self, f"adaptive_resblock{i}", AdaptiveResBlock(dim, smoothing))
        for i in range(2):
            setattr(self, f"up_conv_{i}", Conv(dim // 2**i, dim // 2 ** (i + 1), 3, 1, 1))
            setattr(self, f"layer_ins_norm_{i}", LayerInstanceNorm(dim // 2 ** (i + 1)))
        self.G_logit = Conv(ch, 3, 7, 1, 3)
        _init_tf(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.relu(self.ins_norm(self.conv(x)))
        for i in range(2):
            x = F.relu(getattr(self, f"ins_norm_{i}")(getattr(self, f"conv_{i}")(x)))
        for i in range(self.n_res):
            x = getattr(self, f"resblock_{i}")(x)
        x, cam_logit, heatmap = shared_class_activation(x, self.CAM_logit.weight, self.CAM_logit.bias,
                                                        self.conv_1x1, F.relu)  # fmt: skip

        style = F.adaptive_avg_pool2d(x, 1) if self.light else x
        gamma, beta = self.MLP(style.flatten(1))
        for i in range(self.n_res):
            x = getattr(self, f"adaptive_resblock{i}")(x, gamma, beta)
        for i in range(2):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.relu(getattr(self, f"layer_ins_norm_{i}")(getattr(self, f"up_conv_{i}")(x)))
        return torch.tanh(self.G_logit(x)), cam_logit, heatmap


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class Discriminator(nn.Module):
    """`discriminator_global` / `discriminator_local`: `n_layers - 2` stride-2 4x4 convs (n_dis - 1 globally,
    n_dis - 3 locally), `conv_last` (4x4, stride 1, doubling the channels), the CAM with a spectrally normalised
    classifier, and `D_logit`. Every conv but conv_1x1 is spectrally normalised; the stride-1 ones keep the size."""

    def __init__(self, ch: int = 64, n_layers: int = 5):
        super().__init__()
        self.n_down = n_layers - 2
        channels = [3] + [ch * 2**i for i in range(self.n_down)]
        for i in range(self.n_down):
            setattr(self, f"conv_{i}", SpectralConv(channels[i], channels[i + 1], 4, 2, 1))
        dim = channels[-1] * 2
        self.conv_last = SpectralConv(channels[-1], dim, 4, 1, 1)
        self.CAM_logit = SpectralLinear(dim)
        self.conv_1x1 = Conv(dim * 2, dim, 1)
        self.D_logit = SpectralConv(dim, 1, 4, 1, 1)
        _init_tf(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for i in range(self.n_down):
            x = _leaky_relu(getattr(self, f"conv_{i}")(x))
        x = _leaky_relu(self.conv_last(x))
        cam = self.CAM_logit
        weight = spectral_normalized(cam.weight, cam.u)
        x, cam_logit, heatmap = shared_class_activation(x, weight, cam.bias, self.conv_1x1, _leaky_relu)
        return self.D_logit(x), cam_logit, heatmap
