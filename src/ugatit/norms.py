"""Normalisation layers of U-GAT-IT: AdaILN, ILN, rho clipping, and spectral norm with the official update order.

AdaILN and ILN mix instance-norm and layer-norm statistics with a learned per-channel ratio rho (paper eq. 1). The
official code uses the *unbiased* variance (`torch.var`) and eps 1e-5; so do we, because checkpoints trained with
one and run with the other give visibly different images.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

# A module import (fused.py imports this module back for the exact formula): either can be imported first.
from . import fused as kernels

EPS = 1e-5
_F = TypeVar("_F", bound=Callable)


def eager(fn: _F) -> _F:
    """`torch.compiler.disable(fn)`, made at the first call: it imports dynamo (1.2 s and 70 MB of RSS), which a
    process that only translates never needs (the functions marked are the discriminators')."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call  # type: ignore[return-value]


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
        self.norm = kernels.instance_layer_norm_fused if fused else instance_layer_norm
        self.rho = nn.Parameter(torch.full((1, num_features, 1, 1), 0.9))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.rho, gamma[:, :, None, None], beta[:, :, None, None], self.eps)


class ILN(nn.Module):
    """ILN of the upsampling blocks: rho init 0 (pure layer norm at start), learned per-channel affine."""

    def __init__(self, num_features: int, eps: float = EPS, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.norm = kernels.instance_layer_norm_fused if fused else instance_layer_norm
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
        return kernels.instance_norm_fused(x, self.eps) if self.fused else F.instance_norm(x, eps=self.eps)


@torch.no_grad()
def clip_rho(module: nn.Module) -> None:
    """Clamp every rho of `module` into [0, 1]; the official code does this after each generator update."""
    for sub in module.modules():
        if isinstance(sub, (AdaILN, ILN)):
            sub.rho.clamp_(0.0, 1.0)


def weight_matrix(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight as an (out, fan_in) matrix read in place, and where its columns sit in v's (in, kh, kw) order.

    A channels_last conv weight is read as (out, kh * kw * in) rows: flattening it to v's layout would copy the
    whole weight at every call. The index is None when the columns are already in v's order.
    """
    if weight.dim() == 4 and not weight.is_contiguous():
        out_ch, in_ch, kh, kw = weight.shape
        order = torch.arange(in_ch * kh * kw, device=weight.device).view(in_ch, kh, kw).permute(1, 2, 0).reshape(-1)
        return weight.permute(0, 2, 3, 1).reshape(out_ch, -1), order
    return weight.flatten(1), None


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for tensor's device: sigma, the power iteration, weight-bound products and the fused norms keep
    their own precision, and padding its input's."""
    device = tensor.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


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
    def sigma(self, weight: torch.Tensor, calls: int = 1) -> torch.Tensor:
        """u^T W v after each of `calls` power iterations, as `calls` consecutive calls would see it: a (calls,)
        tensor, differentiable in W with u, v held (training mode only advances the iteration)."""
        with autocast_off(weight):
            weight_mat, order = weight_matrix(weight)
            sigmas = []
            for _ in range(calls):
                v = self._next_v(weight_mat, order)
                wv = torch.mv(weight_mat, v)
                # u and v are fresh tensors, not the buffers: the next call's update must not change vectors that
                # this call's backward still needs (nor may a compiler fold them into the buffers).
                sigmas.append(torch.dot(self._next_u(wv), wv))
            return torch.stack(sigmas)

    @eager
    def matmul(self, cols: torch.Tensor, weight: torch.Tensor, calls: int = 1) -> torch.Tensor:
        """cols @ (W / sigma)^T for `calls` consecutive calls stacked in the rows of cols (equal shares, each with
        its own power iteration): `sigma` and a product with W fused, so that W is read twice per call instead of
        four times and its gradient written once for all of them (`_SpectralMatmul`)."""
        with autocast_off(weight):
            weight_mat, order = weight_matrix(weight)
            vs = [self._next_v(weight_mat, order)]
            for _ in range(calls - 1):  # a later call's v starts from the u of the call before it
                self._next_u(torch.mv(weight_mat, vs[-1]))
                vs.append(self._next_v(weight_mat, order))
            y, u = _SpectralMatmul.apply(cols.float(), weight, torch.stack(vs), self._u, self.training, self.eps)
            if self.training:
                with torch.no_grad():
                    self._u.copy_(u)
            return y

    @torch.no_grad()
    def _next_u(self, wv: torch.Tensor) -> torch.Tensor:
        """u after u <- normalize(W v) in training mode, from W v (stored in the buffer too); a copy of the buffer."""
        if not self.training:
            return self._u.clone(memory_format=torch.contiguous_format)
        u = F.normalize(wv, dim=0, eps=self.eps)
        self._u.copy_(u)
        return u

    @torch.no_grad()
    def _next_v(self, weight_mat: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """v in weight_mat's column order, after v <- normalize(W^T u) in training mode; a copy of the buffer."""
        if not self.training:
            return self._v.clone(memory_format=torch.contiguous_format) if order is None else self._v[order]
        v = F.normalize(torch.mv(weight_mat.t(), self._u), dim=0, eps=self.eps)
        if order is None:
            self._v.copy_(v)
        else:
            self._v[order] = v
        return v


class _SpectralMatmul(torch.autograd.Function):
    """y = cols @ W^T / sigma_k for the rows of call k, sigma_k = u_k^T W v_k (u, v held constant), with the u
    update of each call's power iteration. The rows of cols are `len(vs)` equal shares, one per call.

    Forward: one product W [cols; v_1; ...; v_k]^T gives both cols @ W^T and every W v_k, hence u_k =
    normalize(W v_k) and sigma_k (the last u is returned for the caller to store).
    Backward: with gz = gy / sigma and dsigma_k = -sum(gy * cols @ W^T over call k's rows) / sigma_k^2, grad W =
    gz^T cols + sum_k dsigma_k u_k v_k^T is one product [gz; dsigma_k u_k]^T [cols; v_k], written straight into a
    tensor of W's layout (autograd then adopts it as W's gradient instead of copying it), and grad cols = gz W.
    The products are arranged in the orders that run fastest for these wide matrices (W @ X rather than X @ W^T:
    1.7x).
    """

    @staticmethod
    def forward(ctx, cols, weight, vs, u, training: bool, eps: float):
        weight_mat = weight_matrix(weight)[0]
        calls = vs.shape[0]
        both = weight_mat @ torch.cat([cols, vs]).t()
        z, wv = both[:, :-calls].t(), both[:, -calls:]
        us = F.normalize(wv, dim=0, eps=eps) if training else u.clone()[:, None].expand(-1, calls)
        sigmas = (us * wv).sum(0)
        row_sigma = sigmas.repeat_interleave(z.shape[0] // calls)[:, None]
        ctx.save_for_backward(cols, weight, vs, us, z, row_sigma)
        new_u = us[:, -1].clone()
        ctx.mark_non_differentiable(new_u)
        return z / row_sigma, new_u

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _):
        cols, weight, vs, us, z, row_sigma = ctx.saved_tensors
        gz = gy / row_sigma
        grad_cols = gz @ weight_matrix(weight)[0] if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            calls = vs.shape[0]
            dsigma = -(gy * z).reshape(calls, -1).sum(1) / row_sigma.view(calls, -1)[:, 0] ** 2
            grad_weight = torch.empty_like(weight)  # contiguous or channels_last, like W: its matrix is a view
            torch.mm(torch.cat([gz, (us * dsigma).t()]).t(), torch.cat([cols, vs]), out=weight_matrix(grad_weight)[0])
        return grad_cols, grad_weight, None, None, None, None


def spectral_norm(module: nn.Module) -> nn.Module:
    """Register `SpectralNorm` on `module.weight` (one power iteration per training-mode call)."""
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight.detach()))
    return module


def spectral_parts(module: nn.Module) -> tuple[SpectralNorm, torch.Tensor] | None:
    """The spectral norm of a spectral-normalised module and its raw weight (None for other modules): the fast
    discriminator divides its small outputs by sigma instead of dividing the weight."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return module.parametrizations.weight[0], module.parametrizations.weight.original


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The un-normalised weight: the official discriminator CAM re-weights features with it, not with W / sigma."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
