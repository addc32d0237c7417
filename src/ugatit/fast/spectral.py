"""The fast path's discriminator layers: spectral norm applied to the output, and stacked calls.

`conv(x, W / sigma) + b` is computed as `conv(x, W) / sigma + b`, and where the output is small (the deep layers of
the discriminators are memory-bound: at 128 px the global one's 2048 x 1024 x 4 x 4 conv has 3 x 3 outputs) as one
fp32 matrix product with the power iteration fused in (`_SpectralMatmul`), which reads and writes W fewer times.

`stacked_calls(n)`: inside it, a discriminator called on n equal batches stacked along the batch axis gives the
outputs of n consecutive calls, each advancing the spectral norms' power iterations once. The D update scores the
real and the fake batch in one call this way: one pass over the weights and one gradient for both.

`deferred_weight_grads()`: inside it, those products leave their weight gradients as the two thin factors they are
a product of (a few rows each), and `DeferredGrads.step` builds and applies them one at a time. The weight-bound
layers hold nearly all of a discriminator's weights, so a D update then has one of their gradients alive at a time
instead of all of them (docs/performance.md has the sizes). Under the fast path's Adam on a CPU, each gradient
is built and applied a block of rows at a time instead, into one small buffer: a fresh gradient of the largest
layer's size costs more in first-touch page faults than its product does.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from ..norms import SpectralNorm, eager
from .adam import Adam
from .adam import update as adam_update
from .precision import autocast_off

_CALLS = contextvars.ContextVar("ugatit_fast_calls", default=1)
_ONEDNN_PRODUCT = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _product(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """rows @ matrix^T in fp32. On a CPU by oneDNN's inner product (the op torch.compile's CPU code calls), which
    streams a wide matrix against a few rows much faster than the MKL GEMM behind `@` (docs/performance.md,
    "The 128 px step"); `matrix` may be a transposed view."""
    if _ONEDNN_PRODUCT and rows.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(rows, matrix, None, "none", [], "")
    return rows @ matrix.t()


def _built_grad(grad_rows: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_rows^T @ rows written straight into a tensor of W's shape, which autograd then adopts as W's gradient
    instead of copying it. (A plain GEMM: oneDNN's inner product was slower on this transposed form.)"""
    grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
    torch.mm(grad_rows.t(), rows, out=grad.flatten(1))
    return grad


@dataclasses.dataclass
class DeferredGrads:
    """Weight gradients left by a backward run inside `deferred_weight_grads`: W's gradient is the sum of
    A^T @ B over its factor pairs (A: rows x C_out, B: rows x C_in k k, a few rows each)."""

    factors: dict[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=dict)

    def add(self, weight: torch.Tensor, grad_rows: torch.Tensor, rows: torch.Tensor) -> None:
        self.factors.setdefault(weight, []).append((grad_rows.detach(), rows.detach()))

    def grad(self, weight: torch.Tensor) -> torch.Tensor:
        """W's gradient, built."""
        return _built_grad(*self._joined(weight), weight)

    def _joined(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W's factor pairs as one pair: A^T @ B summed over pairs is the product of the stacked rows."""
        pairs = self.factors[weight]
        return torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])

    def finite(self) -> bool:
        """Whether every deferred gradient is finite, mostly without building it: finite factors whose entries
        bound every sum of products below the dtype's largest value give a finite product."""
        for weight, pairs in self.factors.items():
            if not all(bool(t.isfinite().all()) for pair in pairs for t in pair):
                return False
            bound = sum(a.shape[0] * a.abs().max().item() * b.abs().max().item() for a, b in pairs)
            if bound >= torch.finfo(weight.dtype).max and not bool(self.grad(weight).isfinite().all()):
                return False
        return True

    def step(self, optimizer: torch.optim.Optimizer | Adam) -> None:
        """Update each deferred weight with `optimizer` (a per-parameter rule such as Adam), one weight at a time,
        its gradient built just before and freed just after; with the fast path's Adam on a CPU, built and applied a
        block of rows at a time (`_adam_by_blocks`). The other gradients must be applied (and freed) first, since
        each `optimizer.step()` updates every parameter that has one."""
        for weight in self.factors:
            grad_rows, rows = self._joined(weight)
            if not _adam_by_blocks(optimizer, weight, grad_rows, rows):
                weight.grad = _built_grad(grad_rows, rows, weight)
                optimizer.step()
                weight.grad = None
        self.factors.clear()


_BLOCK_BYTES = 2**21


def _adam_by_blocks(
    optimizer: torch.optim.Optimizer | Adam, weight: torch.Tensor, grad_rows: torch.Tensor, rows: torch.Tensor
) -> bool:
    """`optimizer.step()` for `weight` alone with the gradient grad_rows^T @ rows, built and applied a block of
    output rows at a time into one small buffer (Adam is element-wise: the same numbers as one step on the whole).
    Only for the fast path's Adam (whose moments take their weight's layout) on a CPU, over a contiguous weight;
    False, having done nothing, otherwise."""
    if not (isinstance(optimizer, Adam) and weight.device.type == "cpu" and weight.is_contiguous()):
        return False
    state = optimizer.moments(weight)
    state["step"].add_(1)  # once: every block steps from the same count
    flat, exp_avg, exp_avg_sq = (t.detach().flatten(1) for t in (weight, state["exp_avg"], state["exp_avg_sq"]))
    block = max(1, _BLOCK_BYTES // flat[0].nbytes)
    grad = flat.new_empty(min(block, len(flat)), flat.shape[1])
    group = optimizer.group_of(weight)
    for start in range(0, len(flat), block):
        part = slice(start, start + block)
        block_grad = torch.mm(grad_rows[:, part].t(), rows, out=grad[: len(flat[part])])
        block_state = {"step": state["step"], "exp_avg": exp_avg[part], "exp_avg_sq": exp_avg_sq[part]}
        adam_update([flat[part]], [block_grad], [block_state], group, step=False)
    return True


_DEFERRED: contextvars.ContextVar[DeferredGrads | None] = contextvars.ContextVar("ugatit_fast_deferred", default=None)


@contextlib.contextmanager
def deferred_weight_grads() -> Iterator[DeferredGrads]:
    """A backward run inside this block leaves the fast weight-bound layers' weight gradients in the yielded
    `DeferredGrads` instead of in their `.grad`."""
    deferred = DeferredGrads()
    token = _DEFERRED.set(deferred)
    try:
        yield deferred
    finally:
        _DEFERRED.reset(token)


def _weight_grad(grad_rows: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """W's gradient, or None with its factors left in the `deferred_weight_grads` block's collection."""
    deferred = _DEFERRED.get()
    if deferred is None:
        return _built_grad(grad_rows, rows, weight)
    deferred.add(weight, grad_rows, rows)
    return None


@contextlib.contextmanager
def stacked_calls(calls: int) -> Iterator[None]:
    """Fast discriminator layers called in this block take their input as `calls` stacked consecutive calls."""
    token = _CALLS.set(calls)
    try:
        yield
    finally:
        _CALLS.reset(token)


def _spectral_parts(module: nn.Module) -> tuple[SpectralNorm, torch.Tensor] | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return module.parametrizations.weight[0], module.parametrizations.weight.original


@eager
def sigma(norm: SpectralNorm, weight: torch.Tensor, calls: int = 1) -> torch.Tensor:
    """u^T W v after each of `calls` power iterations, as `calls` consecutive calls would see it: a (calls,) tensor,
    differentiable in W with u, v held."""
    with autocast_off(weight):
        weight_mat = weight.flatten(1)
        sigmas = []
        for _ in range(calls):
            wv = torch.mv(weight_mat, norm.next_v(weight_mat))
            sigmas.append(torch.dot(norm.next_u(wv), wv))
        return torch.stack(sigmas)


@eager
def spectral_matmul(norm: SpectralNorm, cols: torch.Tensor, weight: torch.Tensor, calls: int = 1) -> torch.Tensor:
    """cols @ (W / sigma)^T for `calls` consecutive calls stacked in the rows of cols (equal shares, each with its
    own power iteration): `sigma` and a product with W fused, so that W is read twice per call instead of four
    times and its gradient written once for all of them. W must be contiguous."""
    with autocast_off(weight):
        weight_mat = weight.flatten(1)
        vs = [norm.next_v(weight_mat)]
        for _ in range(calls - 1):  # a later call's v starts from the u of the call before it
            norm.next_u(torch.mv(weight_mat, vs[-1]))
            vs.append(norm.next_v(weight_mat))
        y, u = _SpectralMatmul.apply(cols.float(), weight, torch.stack(vs), norm._u, norm.training, norm.eps)
        if norm.training:
            with torch.no_grad():
                norm._u.copy_(u)
        return y


class _SpectralMatmul(torch.autograd.Function):
    """y = cols @ W^T / sigma_k for the rows of call k, sigma_k = u_k^T W v_k (u, v held constant), with the u
    update of each call's power iteration. The rows of cols are `len(vs)` equal shares, one per call.

    Forward: one product W [cols; v_1; ...; v_k]^T gives both cols @ W^T and every W v_k, hence u_k =
    normalize(W v_k) and sigma_k (the last u is returned for the caller to store).
    Backward: with gz = gy / sigma and dsigma_k = -sum(gy * cols @ W^T over call k's rows) / sigma_k^2, grad W =
    gz^T cols + sum_k dsigma_k u_k v_k^T is one product [gz; dsigma_k u_k]^T [cols; v_k], and grad cols = gz W.
    """

    @staticmethod
    def forward(ctx, cols, weight, vs, u, training: bool, eps: float):
        weight_mat = weight.flatten(1)
        calls = vs.shape[0]
        both = _product(torch.cat([cols, vs]), weight_mat)
        z, wv = both[:-calls], both[-calls:].t()
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
        grad_cols = _product(gz, weight.flatten(1).t()) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            calls = vs.shape[0]
            dsigma = -(gy * z).reshape(calls, -1).sum(1) / row_sigma.view(calls, -1)[:, 0] ** 2
            grad_weight = _weight_grad(torch.cat([gz, (us * dsigma).t()]), torch.cat([cols, vs]), weight)
        return grad_cols, grad_weight, None, None, None, None


class _Matmul(torch.autograd.Function):
    """y = cols @ W^T for a layer without spectral norm, with `_SpectralMatmul`'s products."""

    @staticmethod
    def forward(ctx, cols, weight):
        ctx.save_for_backward(cols, weight)
        return _product(cols, weight.flatten(1))

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        cols, weight = ctx.saved_tensors
        grad_cols = _product(gy, weight.flatten(1).t()) if ctx.needs_input_grad[0] else None
        return grad_cols, _weight_grad(gy, cols, weight) if ctx.needs_input_grad[1] else None


def _windows(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """The input windows of an unpadded convolution as rows, in the column order of `weight.flatten(1)`."""
    kh, kw = weight.shape[2:]
    windows = x.permute(0, 2, 3, 1).unfold(1, kh, stride).unfold(2, kw, stride)  # B, Ho, Wo, C, kh, kw
    return windows.reshape(-1, windows[0, 0, 0].numel())


def _per_call(sigmas: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each call's sigma repeated over its share of y's batch, shaped to divide y and in y's dtype (an fp32 divisor
    would promote bf16 activations to fp32)."""
    divisor = sigmas.repeat_interleave(y.shape[0] // sigmas.numel()).to(y.dtype)
    return divisor.view(-1, *([1] * (y.dim() - 1)))


def _check_calls(x: torch.Tensor) -> int:
    calls = _CALLS.get()
    if x.shape[0] % calls:
        raise ValueError(f"batch of {x.shape[0]} does not split into {calls} stacked calls")
    return calls


@eager  # memory-bound: nothing for a compiler to fuse, and per-layer shapes would recompile it
def spectral_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A discriminator convolution, spectrally normalised or not, with sigma applied to the output and small
    outputs computed as a matrix product; x holds the stacked calls of `stacked_calls`."""
    calls = _check_calls(x)
    spectral = _spectral_parts(conv)
    weight = spectral[1] if spectral else conv.weight
    stride = conv.stride[0]
    batch, _, height, width = x.shape
    out_h, out_w = (height - weight.shape[2]) // stride + 1, (width - weight.shape[3]) // stride + 1
    plain = conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.stride == (stride,) * 2
    if plain and weight.is_contiguous() and batch * out_h * out_w <= weight.shape[0]:
        cols = _windows(x, weight, stride)
        with autocast_off(x):
            if spectral:
                y = spectral_matmul(spectral[0], cols, weight, calls)
            else:
                y = _Matmul.apply(cols.float(), weight)
        y = y.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2)
    else:
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        if spectral:
            y = y / _per_call(sigma(spectral[0], weight, calls), y)
    return y if conv.bias is None else y + conv.bias.to(y.dtype)[:, None, None]  # bf16 stays bf16


def spectral_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The spectrally normalised CAM classifier as x W^T / sigma, with one power iteration per stacked call."""
    calls = _check_calls(x)
    spectral = _spectral_parts(linear)
    if not spectral:
        return nn.Linear.forward(linear, x)
    y = F.linear(x, spectral[1])
    return y / _per_call(sigma(spectral[0], spectral[1], calls), y)


def is_spectral(module: nn.Module) -> bool:
    return _spectral_parts(module) is not None
