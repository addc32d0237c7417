"""Normalisation layers of U-GAT-IT: AdaILN, ILN, rho clipping, and spectral norm with the official update order.

AdaILN and ILN mix instance-norm and layer-norm statistics with a learned per-channel ratio rho (paper eq. 1). The
official code uses the *unbiased* variance (`torch.var`) and eps 1e-5; so do we, because checkpoints trained with
one and run with the other give visibly different images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .fused import instance_layer_norm_fused, instance_norm_fused

EPS = 1e-5


def instance_layer_norm(
    x: torch.Tensor, rho: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """rho * IN(x) + (1 - rho) * LN(x), then scaled by gamma and shifted by beta (all broadcast per channel).

    Written op for op as the official layers compute it, so that this path reproduces their numbers.
    """
    in_mean = x.mean(dim=(2, 3), keepdim=True)
    in_var = x.var(dim=(2, 3), keepdim=True)
    out_in = (x - in_mean) / torch.sqrt(in_var + eps)
    ln_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    ln_var = x.var(dim=(1, 2, 3), keepdim=True)
    out_ln = (x - ln_mean) / torch.sqrt(ln_var + eps)
    out = rho * out_in + (1 - rho) * out_ln
    return out * gamma + beta


class AdaILN(nn.Module):
    """Adaptive ILN: gamma and beta come per sample from the generator's MLP, rho is learned (init 0.9).

    `fused` selects the one-pass kernel with an analytic backward (fused.py): same function, other rounding.
    """

    def __init__(self, num_features: int, eps: float = EPS, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.norm = instance_layer_norm_fused if fused else instance_layer_norm
        self.rho = nn.Parameter(torch.full((1, num_features, 1, 1), 0.9))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.rho, gamma[:, :, None, None], beta[:, :, None, None], self.eps)


class ILN(nn.Module):
    """ILN of the upsampling blocks: rho init 0 (pure layer norm at start), learned per-channel affine."""

    def __init__(self, num_features: int, eps: float = EPS, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.norm = instance_layer_norm_fused if fused else instance_layer_norm
        self.rho = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.rho, self.gamma, self.beta, self.eps)


class InstanceNorm(nn.Module):
    """The encoder's InstanceNorm2d (no affine, biased variance), optionally fused.

    The fused kernel is also what makes channels_last safe: PyTorch's CPU instance_norm returns a wrong input
    gradient for channels_last tensors at batch 1 (forward correct), which the fused backward does not share.
    """

    def __init__(self, fused: bool = False, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm_fused(x, self.eps) if self.fused else F.instance_norm(x, eps=self.eps)


@torch.no_grad()
def clip_rho(module: nn.Module) -> None:
    """Clamp every rho of `module` into [0, 1]; the official code does this after each generator update."""
    for sub in module.modules():
        if isinstance(sub, (AdaILN, ILN)):
            sub.rho.clamp_(0.0, 1.0)


class SpectralNorm(nn.Module):
    """Spectral-norm parametrization with the power-iteration order of the official checkpoints.

    `torch.nn.utils.parametrizations.spectral_norm` updates u before v; the old `torch.nn.utils.spectral_norm`
    that the official code used updates v from u, then u from v. One step of each from the same state gives
    different vectors, so only this order reproduces the official u, v and sigma. The state_dict layout is the
    modern one (`parametrizations.weight.original`, `parametrizations.weight.0._u` / `._v`).
    """

    def __init__(self, weight: torch.Tensor, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        rows = weight.shape[0]
        cols = weight[0].numel()
        self.register_buffer("_u", F.normalize(weight.new_empty(rows).normal_(0, 1), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(weight.new_empty(cols).normal_(0, 1), dim=0, eps=eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        device = weight.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):  # sigma and u, v stay fp32
            with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=False):
                return self._normalise(weight)
        return self._normalise(weight)

    def _normalise(self, weight: torch.Tensor) -> torch.Tensor:
        weight_mat = weight.flatten(1)
        if self.training:
            with torch.no_grad():
                F.normalize(torch.mv(weight_mat.t(), self._u), dim=0, eps=self.eps, out=self._v)
                F.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps, out=self._u)
        # Clones: a second call must not change vectors that the first call's backward still needs.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, torch.mv(weight_mat, v))
        return weight / sigma


def spectral_norm(module: nn.Module) -> nn.Module:
    """Register `SpectralNorm` on `module.weight` (one power iteration per training-mode call)."""
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight.detach()))
    return module


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The un-normalised weight: the official discriminator CAM re-weights features with it, not with W / sigma."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
