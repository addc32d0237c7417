"""The normalisations of U-GAT-IT: AdaILN, ILN, rho clipping, and spectral norm in the official update order.

AdaILN and ILN mix instance-norm and layer-norm statistics with a learned per-channel ratio rho (paper eq. 1). The
official code uses the *unbiased* variance (`torch.var`) and eps 1e-5; so do we, because checkpoints trained with
one and run with the other give visibly different images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

EPS = 1e-5
_F = TypeVar("_F", bound=Callable)


def instance_layer_norm(
    x: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = EPS,
    correction: int = 1,
) -> torch.Tensor:
    """rho * IN(x) + (1 - rho) * LN(x), then scaled by gamma and shifted by beta (all broadcast per channel).

    Written op for op as the official layers compute it, so that this path reproduces their numbers. The variance
    is unbiased (`correction` 1) as in the official PyTorch code; the TF code's is biased (0). An ONNX export
    writes the same function as `instance_layer_norm_affine`.
    """
    if torch.onnx.is_in_onnx_export():
        return instance_layer_norm_affine(x, rho, gamma, beta, eps, correction)
    in_mean = x.mean(dim=(2, 3), keepdim=True)
    in_var = x.var(dim=(2, 3), keepdim=True, correction=correction)
    out_in = (x - in_mean) / torch.sqrt(in_var + eps)
    ln_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    ln_var = x.var(dim=(1, 2, 3), keepdim=True, correction=correction)
    out_ln = (x - ln_mean) / torch.sqrt(ln_var + eps)
    out = rho * out_in + (1 - rho) * out_ln
    return out * gamma + beta


def instance_layer_norm_affine(
    x: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = EPS,
    correction: int = 1,
) -> torch.Tensor:
    """`instance_layer_norm` as one scale and shift per (sample, channel) of the centred input.

    The form an exported graph runs fastest: two reductions, then three element-wise passes over x, where the
    op-for-op formula takes about fifteen; in an int8 graph the dequantized convolution output also feeds one
    node instead of several, so it is dequantized once. The layer statistics are combined from the channel ones
    (parallel-variance formula) and every variance is taken from centred values, so in fp32 it is as close to the
    exact value as the op-for-op formula.
    """
    n = x.shape[2] * x.shape[3]
    in_mean = x.mean(dim=(2, 3), keepdim=True)
    centred = x - in_mean
    in_var = (centred * centred).mean(dim=(2, 3), keepdim=True)  # biased
    ln_mean = in_mean.mean(dim=1, keepdim=True)
    offset = in_mean - ln_mean
    ln_var = (in_var + offset * offset).mean(dim=1, keepdim=True)  # biased
    in_std = torch.sqrt(in_var * (n / (n - correction)) + eps)
    ln_std = torch.sqrt(ln_var * (x.shape[1] * n / (x.shape[1] * n - correction)) + eps)
    scale = gamma * (rho / in_std + (1 - rho) / ln_std)
    shift = beta + gamma * (1 - rho) * offset / ln_std
    return centred * scale + shift


class AdaILN(nn.Module):
    """Adaptive ILN: gamma and beta come per sample from the generator's MLP, rho is learned (init 0.9)."""

    def __init__(self, num_features: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, num_features, 1, 1), 0.9))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return instance_layer_norm(x, self.rho, gamma[:, :, None, None], beta[:, :, None, None], self.eps)


class ILN(nn.Module):
    """ILN of the upsampling blocks: rho init 0 (pure layer norm at start), learned per-channel affine."""

    def __init__(self, num_features: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_layer_norm(x, self.rho, self.gamma, self.beta, self.eps)


@torch.no_grad()
def clip_rho(module: nn.Module) -> None:
    """Clamp every rho of `module` into [0, 1]; both official codes do this after each generator update."""
    for sub in module.modules():
        rho = getattr(sub, "rho", None)
        if isinstance(rho, nn.Parameter):
            rho.clamp_(0.0, 1.0)


def eager(fn: _F) -> _F:
    """`fn`, run eagerly inside a torch.compile'd region (`torch.compiler.disable`, made there at its first call) and
    called as it is outside one: marking a function imports the compiler, which would cost every process that
    compiles nothing start-up time and memory."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call  # type: ignore[return-value]


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
        return weight / self.sigma(weight)

    # Eager under torch.compile: compiled graphs save the u buffer itself for the backward (it equals the fresh u),
    # and the next call's update then invalidates it (discriminators are called twice before one backward).
    @eager
    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """u^T W v after one power iteration (training mode only), differentiable in W with u and v held."""
        weight_mat = weight.flatten(1)
        wv = torch.mv(weight_mat, self.next_v(weight_mat))
        return torch.dot(self.next_u(wv), wv)

    # u and v come back as fresh tensors, not the buffers: the next call's update must not change vectors that
    # this call's backward still needs (nor may a compiler fold them into the buffers).

    @torch.no_grad()
    def next_v(self, weight_mat: torch.Tensor) -> torch.Tensor:
        """v after v <- normalize(W^T u) in training mode (stored in the buffer too); a copy of the buffer."""
        if not self.training:
            return self._v.clone(memory_format=torch.contiguous_format)
        v = F.normalize(torch.mv(weight_mat.t(), self._u), dim=0, eps=self.eps)
        self._v.copy_(v)
        return v

    @torch.no_grad()
    def next_u(self, wv: torch.Tensor) -> torch.Tensor:
        """u after u <- normalize(W v) in training mode, from W v (stored in the buffer too); a copy of the buffer."""
        if not self.training:
            return self._u.clone(memory_format=torch.contiguous_format)
        u = F.normalize(wv, dim=0, eps=self.eps)
        self._u.copy_(u)
        return u


def spectral_norm(module: nn.Module) -> nn.Module:
    """Register `SpectralNorm` on `module.weight` (one power iteration per training-mode call)."""
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight.detach()))
    return module


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The weight before spectral normalisation (the official discriminator's CAM re-weights features with it)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
