"""The U-GAT-IT networks (docs/spec.md sections 1 and 2): the ResNet generator with CAM attention and AdaILN, and the
CAM discriminator with spectral norm.

Plain `nn` modules with the official module and key names (`DownBlock`, `UpBlock1_1`, `UpBlock2`, `FC`, ...), so that
checkpoints of the official PyTorch code map onto ours key for key (`official.py`). Every network returns
`(output, cam_logit, heatmap)`: cam_logit is the B x 2 auxiliary classifier output (global average and max pooling
branches), heatmap the channel sum of the attended feature map. Faster kernels are swapped in at run time by
`ugatit.fast`, which keeps these parameters and this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import tf_models
from .config import ModelConfig
from .norms import ILN, AdaILN, raw_weight, spectral_norm

GENERATORS = ("genA2B", "genB2A")
DISCRIMINATORS = ("disGA", "disGB", "disLA", "disLB")
NETWORKS = GENERATORS + DISCRIMINATORS
DIRECTIONS = {"A2B": "genA2B", "B2A": "genB2A"}  # translation direction -> the generator that translates it


def generator_name(direction: str) -> str:
    """The network that translates in `direction` ("A2B" -> "genA2B")."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} must be one of: {', '.join(DIRECTIONS)}")
    return DIRECTIONS[direction]


def class_activation(
    x: torch.Tensor, gap_fc: nn.Module, gmp_fc: nn.Module, conv1x1: nn.Module, activation: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CAM block of both networks: (attended features, cam_logit, heatmap).

    The two classifiers' logits come from globally average- and max-pooled features; the feature map re-weighted by
    each classifier's weight, both maps concatenated (2C channels), goes through the 1x1 convolution back to C
    channels and the activation; the heatmap is the channel sum of the result. The weights are the raw ones, as in
    the official code (for a spectrally normalised classifier, not W / sigma). The operations run in the official
    order, which fixes the order in which autograd sums the gradients reaching `x`.
    """
    batch = x.shape[0]
    gap_logit = gap_fc(F.adaptive_avg_pool2d(x, 1).view(batch, -1))
    gap = x * raw_weight(gap_fc)[:, :, None, None]
    gmp_logit = gmp_fc(F.adaptive_max_pool2d(x, 1).view(batch, -1))
    gmp = x * raw_weight(gmp_fc)[:, :, None, None]
    x = activation(conv1x1(torch.cat([gap, gmp], 1)))
    return x, torch.cat([gap_logit, gmp_logit], 1), torch.sum(x, dim=1, keepdim=True)


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """Reflection pad, then an unpadded convolution without bias (a norm follows it)."""
    return [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(in_ch, out_ch, kernel, stride, 0, bias=False)]


class ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            *conv_block(dim, dim, 3),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            *conv_block(dim, dim, 3),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetAdaILNBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.pad1, self.conv1 = conv_block(dim, dim, 3)
        self.norm1 = AdaILN(dim)
        self.relu1 = nn.ReLU(True)
        self.pad2, self.conv2 = conv_block(dim, dim, 3)
        self.norm2 = AdaILN(dim)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(self.pad1(x)), gamma, beta))
        out = self.norm2(self.conv2(self.pad2(out)), gamma, beta)
        return out + x


class ResnetGenerator(nn.Module):
    """Encoder, CAM, gamma/beta MLP, AdaILN residual decoder and upsampling.

    In full mode the MLP reads the whole flattened bottleneck, which binds the network to `img_size`; light mode
    pools it first and runs at any size that is a multiple of 4.
    """

    def __init__(self, ch: int = 64, n_res: int = 4, img_size: int = 256, light: bool = False):
        super().__init__()
        self.light = light
        self.n_res = n_res
        dim = ch * 4
        down = [*conv_block(3, ch, 7), nn.InstanceNorm2d(ch), nn.ReLU(True)]
        for i in range(2):
            mult = 2**i
            down += [*conv_block(ch * mult, ch * mult * 2, 3, 2), nn.InstanceNorm2d(ch * mult * 2), nn.ReLU(True)]
        down += [ResnetBlock(dim) for _ in range(n_res)]

        self.gap_fc = nn.Linear(dim, 1, bias=False)
        self.gmp_fc = nn.Linear(dim, 1, bias=False)
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.relu = nn.ReLU(True)
        mlp_in = dim if light else (img_size // 4) ** 2 * dim
        self.gamma = nn.Linear(dim, dim, bias=False)
        self.beta = nn.Linear(dim, dim, bias=False)
        for i in range(n_res):
            setattr(self, f"UpBlock1_{i + 1}", ResnetAdaILNBlock(dim))

        up = []
        for i in range(2):
            mult = 2 ** (2 - i)
            up += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                *conv_block(ch * mult, ch * mult // 2, 3),
                ILN(ch * mult // 2),
                nn.ReLU(True),
            ]
        up += [*conv_block(ch, 3, 7), nn.Tanh()]

        # Registered last, as in the official code, so that state_dict() lists keys in the official order.
        self.DownBlock = nn.Sequential(*down)
        self.FC = nn.Sequential(
            nn.Linear(mlp_in, dim, bias=False), nn.ReLU(True), nn.Linear(dim, dim, bias=False), nn.ReLU(True)
        )
        self.UpBlock2 = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, cam_logit, heatmap = class_activation(self.DownBlock(x), self.gap_fc, self.gmp_fc, self.conv1x1, self.relu)

        style = F.adaptive_avg_pool2d(x, 1) if self.light else x
        style = self.FC(style.reshape(x.shape[0], -1))
        gamma, beta = self.gamma(style), self.beta(style)
        for i in range(self.n_res):
            x = getattr(self, f"UpBlock1_{i + 1}")(x, gamma, beta)
        return self.UpBlock2(x), cam_logit, heatmap


class Discriminator(nn.Module):
    """PatchGAN discriminator with spectral norm and its own CAM.

    `n_layers - 2` stride-2 convs, one stride-1 conv, the CAM, and a final 4x4 conv to patch logits. The official
    global discriminator has 7 layers (286 px receptive field), the local one 5 (70 px).
    """

    def __init__(self, ch: int = 64, n_layers: int = 5):
        super().__init__()

        def layer(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
            conv = spectral_norm(nn.Conv2d(in_ch, out_ch, 4, stride, 0, bias=True))
            return [nn.ReflectionPad2d(1), conv, nn.LeakyReLU(0.2, True)]

        layers = layer(3, ch, 2)
        for i in range(1, n_layers - 2):
            mult = 2 ** (i - 1)
            layers += layer(ch * mult, ch * mult * 2, 2)
        mult = 2 ** (n_layers - 3)
        layers += layer(ch * mult, ch * mult * 2, 1)
        dim = ch * mult * 2
        self.gap_fc = spectral_norm(nn.Linear(dim, 1, bias=False))
        self.gmp_fc = spectral_norm(nn.Linear(dim, 1, bias=False))
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.leaky_relu = nn.LeakyReLU(0.2, True)
        self.pad = nn.ReflectionPad2d(1)
        self.conv = spectral_norm(nn.Conv2d(dim, 1, 4, 1, 0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, cam_logit, heatmap = class_activation(self.model(x), self.gap_fc, self.gmp_fc, self.conv1x1, self.leaky_relu)
        return self.conv(self.pad(x)), cam_logit, heatmap


def build_generator(config: ModelConfig) -> nn.Module:
    """A generator of `config.arch`: the official PyTorch code's, or the official TF code's (`tf_models.py`)."""
    if config.arch == "official-tf":
        return tf_models.Generator(config.ch, config.n_res, config.img_size, config.light, bool(config.rho_smoothing))
    return ResnetGenerator(config.ch, config.n_res, config.img_size, config.light)


def build_discriminator(config: ModelConfig, layers: int) -> nn.Module:
    if config.arch == "official-tf":
        return tf_models.Discriminator(config.ch, layers)
    return Discriminator(config.ch, layers)


def build_networks(config: ModelConfig) -> dict[str, nn.Module]:
    """The six networks, keyed by their official PyTorch names; disG* judge globally, disL* locally."""
    nets: dict[str, nn.Module] = {name: build_generator(config) for name in GENERATORS}
    for domain in "AB":
        nets[f"disG{domain}"] = build_discriminator(config, config.global_layers)
        nets[f"disL{domain}"] = build_discriminator(config, config.local_layers)
    return {name: nets[name] for name in NETWORKS}
