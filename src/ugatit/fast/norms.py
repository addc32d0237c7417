"""Fused instance/layer normalisation: ILN/AdaILN and InstanceNorm as single autograd nodes with analytic backward.

`instance_layer_norm_fused(x, rho, gamma, beta, eps)` computes what `ugatit.norms.instance_layer_norm` computes
(unbiased variances, eps 1e-5, rho mixing the instance and layer statistics, per-sample or per-channel gamma/beta),
as one `torch.autograd.Function`:

* forward: one pass over x for the per-(b,c) mean and variance; the layer statistics of each sample are combined
  from the per-channel ones (parallel-variance formula, no second pass over x); the output is a per-(b,c) affine
  map of x (or of the normalised planes), one more pass.
* backward: one pass over (grad, x) for the per-(b,c) sums of grad and of grad * (x - mean); the gradients of rho,
  gamma and beta follow from them in closed form, and grad x = a * grad + c1 * (x - mean) + c0 with per-(b,c)
  coefficients, in two element-wise passes. Only x (and (B, C) statistics) is saved for the backward.

The passes run on ATen's vectorised normalisation kernels, used as building blocks: `native_group_norm` with one
group per channel for the statistics of NCHW fp32 inputs, `batch_norm_update_stats` on (1, B*C, H, W) views or per
sample (channels_last, bf16), the weight/bias half of `native_batch_norm_backward` for the backward sums, and the
inference-mode batch-norm kernel as the per-channel multiply-add. The generic formulations are far slower on CPU
(`torch.var_mean` is a scalar Welford loop, broadcast element-wise ops with two per-channel operands do not
vectorise). bf16/fp16 inputs: every statistic and per-(b,c) coefficient is computed and kept in fp32; the big
tensors stay in the input dtype, so the output has the input's dtype.

With `rectify=True` both return relu(norm(x)) as the same one node: a norm followed by a ReLU keeps x alone for
the backward, where the ReLU would keep its output too. The output then carries how it was made (`Rectified`):
the next padded convolution (`fast/convolution.py`) keeps that recipe, whose tensors the norm keeps anyway, instead
of its input, and recomputes the input in its backward, bit for bit. Both recomputations are one element-wise pass
over x.

`instance_norm_fused(x, eps)` replaces `F.instance_norm(x)` (biased variance, no affine: the encoder's
`nn.InstanceNorm2d`) with the same building blocks; it is also right where PyTorch's CPU instance_norm returns a
wrong input gradient (channels_last at batch 1). Speed against the exact formula and `torch.compile`, and the
numerical error against the exact path: docs/performance.md, "Fused normalisations". Double backward is not
supported (the official training never differentiates through a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# instance_layer_norm: the exact formula, the fallback for shapes the kernels do not cover
from ..norms import EPS, instance_layer_norm, instance_layer_norm_affine
from .precision import autocast_off

__all__ = [
    "Rectified",
    "instance_layer_norm_fused",
    "instance_layer_norm_fp32_affine",
    "instance_norm_fused",
]

_REDUCED = (torch.bfloat16, torch.float16)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x and 'nchw' when each (b,c) plane is one contiguous row, 'nhwc' for channels_last; other strides copied."""
    if x.is_contiguous():
        return x, "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, "nhwc"
    return x.contiguous(), "nchw"


def _like_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def _planes(x: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """Views on which batch-norm kernels see one channel per (b,c): (1, B*C, H, W) for NCHW, else one per sample."""
    b, c, h, w = x.shape
    if layout == "nchw":
        return [x.view(1, b * c, h, w)]
    return [x[i : i + 1] for i in range(b)]


def _per_plane(t: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """(B, C) coefficients split like `_planes`: one (B*C,) vector for NCHW, else one (C,) vector per sample."""
    return [t.reshape(-1)] if layout == "nchw" else list(t.unbind(0))


# Other devices get a device-generic formulation (plain reductions and broadcast ops, statistics in fp32); the CPU
# path below builds on ATen's vectorised CPU normalisation kernels. Tests set this to run the generic path on CPU.
GENERIC_ON_CPU = False


def _generic(x: torch.Tensor) -> bool:
    return GENERIC_ON_CPU or x.device.type != "cpu"


def _stats(x: torch.Tensor, layout: str, eps: float):
    """Per-(b,c) mean and sd = sqrt(biased var + eps), both (B, C) in fp32 (fp64 for fp64 inputs).

    For NCHW fp32/fp64 also returns the normalised planes (x - mean) / sd as a fresh tensor (the group-norm kernel
    computes them anyway, and faster than batch norm computes statistics alone), else None.
    """
    b, c, h, w = x.shape
    if _generic(x):
        var, mean = torch.var_mean(x.to(_stat_dtype(x)), dim=(2, 3), correction=0)
        return mean, var.add_(eps).sqrt_(), None
    if layout == "nchw" and x.dtype not in _REDUCED:
        y, mean, rstd = torch.native_group_norm(x, None, None, b, c, h * w, c, eps)
        return mean.view(b, c), rstd.view(b, c).reciprocal(), y
    sdt = _stat_dtype(x)
    k = b * c if layout == "nchw" else c
    # fp32 running buffers (left unchanged by momentum 0) select the mixed-type kernel: fp32 statistics for bf16.
    run_mean, run_var = (x.new_zeros(k, dtype=sdt), x.new_ones(k, dtype=sdt)) if x.dtype in _REDUCED else (None, None)
    stats = [torch.batch_norm_update_stats(p, run_mean, run_var, 0.0) for p in _planes(x, layout)]
    if len(stats) == 1:
        mean, var = stats[0]
    else:
        mean, var = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
    return mean.view(b, c), var.view(b, c).add(eps).sqrt_(), None


def _affine(x: torch.Tensor, layout: str, scale: torch.Tensor, shift: torch.Tensor, out=None) -> torch.Tensor:
    """scale * x + shift with (B, C) coefficients, computed in the coefficients' precision, stored in x's dtype.

    `out=x` applies it in place (an element-wise map, so the aliasing is safe).
    """
    b, c, h, w = x.shape
    if _generic(x):  # (never in place: the generic _stats returns no planes)
        return torch.addcmul(shift.reshape(-1, c, 1, 1), x.to(scale.dtype), scale.reshape(-1, c, 1, 1)).to(x.dtype)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    scale = scale.expand(b, c).contiguous()
    shift = shift.expand(b, c).contiguous()
    zero = scale.new_zeros(scale.numel() if layout == "nchw" else c)
    one = scale.new_ones(zero.numel())
    empty = scale.new_empty(0)
    # Inference-mode batch norm: (x - 0) / sqrt(1 + 0) * scale + shift, one vectorised pass.
    for xp, op, sc, sh in zip(
        _planes(x, layout), _planes(out, layout), _per_plane(scale, layout), _per_plane(shift, layout), strict=True
    ):
        torch.ops.aten.native_batch_norm.out(
            xp, sc, sh, zero, one, False, 0.0, 0.0, out=op, save_mean=empty, save_invstd=empty
        )
    return out


def _grad_sums(g: torch.Tensor, x: torch.Tensor, layout: str, mean: torch.Tensor):
    """Per-(b,c) sums of g * (x - mean) and of g, (B, C) in mean's dtype, in one pass over (g, x)."""
    b, c = mean.shape
    if _generic(x):
        sg = g.sum(dim=(2, 3), dtype=mean.dtype)
        return (g.to(mean.dtype) * (x.to(mean.dtype) - mean.view(b, c, 1, 1))).sum(dim=(2, 3)), sg
    ones = mean.new_ones(b * c if layout == "nchw" else c)
    dots, sums = [], []
    for gp, xp, m in zip(_planes(g, layout), _planes(x, layout), _per_plane(mean, layout), strict=True):
        # With invstd = 1: grad_weight = sum g * (x - mean), grad_bias = sum g; no grad_input pass.
        _, dot, total = torch.ops.aten.native_batch_norm_backward(
            gp, xp, ones, None, None, m, ones, True, 0.0, [False, True, True]
        )
        dots.append(dot)
        sums.append(total)
    if len(dots) == 1:
        return dots[0].view(b, c), sums[0].view(b, c)
    return torch.stack(dots), torch.stack(sums)


def _grad_input(g, x, layout, mean, a, c1, c0) -> torch.Tensor:
    """a * g + c1 * (x - mean) + c0 with (B, C) coefficients, in x's dtype: two element-wise passes."""
    b, c = mean.shape
    if _generic(x):
        s = mean.dtype
        out = torch.addcmul((c0 - c1 * mean).view(b, c, 1, 1), x.to(s), c1.view(b, c, 1, 1))
        return out.addcmul_(g.to(s), a.expand(b, c).reshape(b, c, 1, 1)).to(x.dtype)
    out = _affine(x, layout, c1, c0 - c1 * mean)
    # One per-channel operand keeps this op vectorised; for bf16 the coefficient is rounded to bf16 (~2^-9).
    return out.addcmul_(g, a.expand(b, c).reshape(b, c, 1, 1).to(x.dtype))


def _rectified_affine(x: torch.Tensor, layout: str, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(scale * x + shift): a rectified output, made the same way in the forward and in each recomputation."""
    return _affine(x, layout, scale, shift).relu_()


def _rectified_grad(g, x: torch.Tensor, layout: str, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The ReLU's backward, g where scale * x + shift > 0 and 0 elsewhere, with the ReLU's input recomputed."""
    return torch.ops.aten.threshold_backward(g, _affine(x, layout, scale, shift), 0)


_RECIPE = "_ugatit_rectified"


@dataclass(frozen=True)
class Rectified:
    """How a rectified fused-norm output was made: relu(scale * source + shift), with (B, C) coefficients in the
    statistics' dtype (fp32, or fp64 for fp64 inputs).

    A consumer that needs that output in its backward keeps this instead: the norm keeps `source` anyway."""

    source: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def recompute(self) -> torch.Tensor:
        """The output again, bit for bit."""
        x, layout = _layout(self.source)
        return _rectified_affine(x, layout, self.scale, self.shift)

    @staticmethod
    def of(t: torch.Tensor) -> Rectified | None:
        """The recipe of `t`, if `t` is a rectified output made while autograd was recording and not changed in
        place since (the recipe would make its old values), else None."""
        recipe, version = getattr(t, _RECIPE, (None, None))
        return recipe if version == t._version else None

    @staticmethod
    def forget(t: torch.Tensor) -> torch.Tensor:
        """`t` without its recipe, which holds the norm's input: where `t` itself is kept whole (a boundary of
        gradient checkpointing), the recipe would keep a second map alive for nothing."""
        vars(t).pop(_RECIPE, None)
        return t


def _normalized(function: type[torch.autograd.Function], x: torch.Tensor, *args, rectify: bool) -> torch.Tensor:
    """`function` (a fused norm, its last argument `rectify`) on x, with the ReLU after it if `rectify`. Only while
    autograd records the call is the rectified output made from x as one node and given its recipe; otherwise the
    ReLU runs in place on the norm's usual output, as the exact layers do."""
    recording = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, *args))
    with autocast_off(x):
        if not (rectify and recording):
            out = function.apply(x, *args, False)
            return out.relu_() if rectify else out
        out, scale, shift = function.apply(x, *args, True)
    if not torch.compiler.is_compiling():
        setattr(out, _RECIPE, (Rectified(x.detach(), scale, shift), out._version))
    return out


class _InstanceLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rho, gamma, beta, eps, rectify):
        b, c, h, w = x.shape
        n = h * w
        x, layout = _layout(x)
        # sqrt(unbiased var + eps) = sqrt(N / (N - 1)) * sqrt(biased var + eps (N - 1) / N).
        eps_plane = eps * (n - 1) / n
        mean, sd, y = _stats(x, layout, eps_plane)
        var = (sd * sd - eps_plane).clamp_min_(0.0)  # biased per-channel variance
        r_in = sd.reciprocal().mul_(((n - 1) / n) ** 0.5)
        mu_l = mean.mean(1, keepdim=True)
        dev = mean - mu_l
        # Sum over a sample of (x - mu_l)^2 = N * sum_c (var_c + (mean_c - mu_l)^2): no second pass over x.
        var_l = torch.addcmul(var, dev, dev).sum(1, keepdim=True).mul_(n / (c * n - 1))
        r_ln = var_l.add_(eps).rsqrt_()
        sdt = mean.dtype
        rho_v = rho.reshape(1, c).to(sdt)
        gam = gamma.reshape(-1, c).to(sdt)
        bet = beta.reshape(-1, c).to(sdt)
        p = rho_v * r_in
        q = (1 - rho_v) * r_ln
        a = gam * (p + q)
        # out = a (x - mean) + gam q (mean - mu_l) + beta
        shift = torch.addcmul(bet, gam * q, dev)
        ctx.layout = layout
        ctx.meta = (rho.shape, rho.dtype, gamma.shape, gamma.dtype, beta.shape, beta.dtype)
        ctx.rectify = rectify
        if rectify:  # from x, as `Rectified.recompute` makes it (any normalised planes y go unused)
            scale, shift = a.expand(b, c).contiguous(), shift - a * mean
            ctx.save_for_backward(x, mean, r_in, r_ln, rho_v, gam, scale, shift)
            ctx.mark_non_differentiable(scale, shift)
            return _rectified_affine(x, layout, scale, shift), scale, shift
        if y is not None:
            out = _affine(y, layout, a * sd, shift, out=y)
        else:
            out = _affine(x, layout, a, shift - a * mean)
        ctx.save_for_backward(x, mean, r_in, r_ln, rho_v, gam)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_):
        x, mean, r_in, r_ln, rho_v, gam, *rectified = ctx.saved_tensors
        layout = ctx.layout
        rho_shape, rho_dtype, gamma_shape, gamma_dtype, beta_shape, beta_dtype = ctx.meta
        b, c, h, w = x.shape
        n = h * w
        m = c * n
        g = _like_layout(grad, layout)
        if ctx.rectify:
            g = _rectified_grad(g, x, layout, *rectified)
        d_in, sg = _grad_sums(g, x, layout, mean)  # sum g (x - mean), sum g
        dev = mean - mean.mean(1, keepdim=True)
        d_ln = torch.addcmul(d_in, dev, sg)  # sum g (x - mu_l)
        p = rho_v * r_in
        q = (1 - rho_v) * r_ln
        grad_x = grad_rho = grad_gamma = grad_beta = None
        if ctx.needs_input_grad[0]:
            k_in = rho_v * gam
            k_ln = gam - k_in
            t_g = (k_ln * sg).sum(1, keepdim=True)
            t_gx = (k_ln * d_ln).sum(1, keepdim=True)
            s_ln = r_ln.pow(3).mul_(t_gx).div_(m - 1)
            s_in = (k_in * r_in.pow(3)).mul_(d_in).div_(n - 1)
            # d/dx of the instance part:  k_in r_in (g - sum g / N) - k_in r_in^3 (x - mean) sum g (x - mean) / (N - 1)
            # d/dx of the layer part:     r_ln (k_ln g - T_g / M) - r_ln^3 (x - mu_l) T_gx / (M - 1),
            # with T_g = sum_c k_ln sum g and T_gx = sum_c k_ln sum g (x - mu_l) over the sample.
            c1 = -(s_in + s_ln)
            c0 = -((k_in * r_in).mul_(sg).div_(n) + r_ln * t_g / m + s_ln * dev)
            grad_x = _grad_input(g, x, layout, mean, gam * (p + q), c1, c0)
        if ctx.needs_input_grad[1]:
            grad_rho = (gam * (r_in * d_in - r_ln * d_ln)).sum(0).view(rho_shape).to(rho_dtype)
        if ctx.needs_input_grad[2]:
            gg = p * d_in + q * d_ln
            grad_gamma = (gg if gamma_shape[0] == b else gg.sum(0)).reshape(gamma_shape).to(gamma_dtype)
        if ctx.needs_input_grad[3]:
            grad_beta = (sg if beta_shape[0] == b else sg.sum(0)).reshape(beta_shape).to(beta_dtype)
        return grad_x, grad_rho, grad_gamma, grad_beta, None, None


def _param_ok(t, b: int, c: int, rows=(1,)) -> bool:
    """A (1, C, 1, 1) tensor, or (B, C, 1, 1) where `rows` allows B."""
    return (
        isinstance(t, torch.Tensor)
        and t.dim() == 4
        and t.dtype.is_floating_point
        and (t.shape[0] == 1 or t.shape[0] in rows)
        and t.shape[1:] == (c, 1, 1)
    )


def instance_layer_norm_fused(
    x: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = EPS,
    rectify: bool = False,
) -> torch.Tensor:
    """`ugatit.norms.instance_layer_norm` as one autograd node: rho * IN(x) + (1 - rho) * LN(x), times gamma plus beta,
    and with `rectify` a ReLU after it (the output then carries its `Rectified` recipe).

    x: (B, C, H, W), NCHW or channels_last, fp32/fp64/bf16/fp16 (the output keeps x's layout and dtype); rho:
    (1, C, 1, 1); gamma, beta: (B, C, 1, 1) (AdaILN) or (1, C, 1, 1) (ILN). Any other shapes, and planes of one
    pixel, fall back to the exact formula.
    """
    if not (
        x.dim() == 4
        and x.dtype.is_floating_point
        and x.shape[2] * x.shape[3] > 1
        and _param_ok(rho, x.shape[0], x.shape[1])
        and _param_ok(gamma, x.shape[0], x.shape[1], rows=(x.shape[0],))
        and _param_ok(beta, x.shape[0], x.shape[1], rows=(x.shape[0],))
    ):
        out = instance_layer_norm(x, rho, gamma, beta, eps)
        return F.relu(out) if rectify else out
    return _normalized(_InstanceLayerNorm, x, rho, gamma, beta, eps, rectify=rectify)


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, rectify):
        b, c, h, w = x.shape
        x, layout = _layout(x)
        mean, sd, y = _stats(x, layout, eps)
        rstd = sd.reciprocal()
        ctx.layout = layout
        ctx.rectify = rectify
        if rectify:  # from x, as `Rectified.recompute` makes it (any normalised planes y go unused)
            shift = -mean * rstd
            ctx.save_for_backward(x, mean, rstd, shift)
            ctx.mark_non_differentiable(rstd, shift)
            return _rectified_affine(x, layout, rstd, shift), rstd, shift
        if y is None:
            y = _affine(x, layout, rstd, -mean * rstd)
        ctx.save_for_backward(x, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_):
        x, mean, rstd, *shift = ctx.saved_tensors
        layout = ctx.layout
        b, c, h, w = x.shape
        n = h * w
        g = _like_layout(grad, layout)
        if ctx.rectify:
            g = _rectified_grad(g, x, layout, rstd, *shift)
        if layout == "nchw" and x.dtype not in _REDUCED:
            dx, _, _ = torch.ops.aten.native_layer_norm_backward(
                g.view(b * c, n), x.view(b * c, n), [n], mean.view(-1, 1), rstd.view(-1, 1), None, None,
                [True, False, False],
            )  # fmt: skip
            return dx.view(b, c, h, w), None, None
        # rstd (g - sum g / N) - rstd^3 (x - mean) sum g (x - mean) / N
        dot, sg = _grad_sums(g, x, layout, mean)
        return _grad_input(g, x, layout, mean, rstd, -rstd.pow(3) * dot / n, -rstd * sg / n), None, None


def instance_norm_fused(x: torch.Tensor, eps: float = EPS, rectify: bool = False) -> torch.Tensor:
    """`F.instance_norm(x, eps=eps)` (biased variance, no affine, no running statistics) for (B, C, H, W) inputs,
    and with `rectify` a ReLU after it (the output then carries its `Rectified` recipe).

    Keeps x's dtype and memory layout (NCHW or channels_last); statistics in fp32 for bf16/fp16 inputs.
    """
    if x.dim() != 4 or not x.dtype.is_floating_point or (x.dtype in _REDUCED and x.is_contiguous()):
        out = F.instance_norm(x, eps=eps)
        return F.relu(out) if rectify else out
    return _normalized(_InstanceNorm, x, eps, rectify=rectify)


def instance_layer_norm_fp32_affine(
    x: torch.Tensor, rho: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, correction: int
) -> torch.Tensor:
    """ILN / AdaILN with any variance correction (the TF architecture's biased ones, which the fused kernel does not
    take): `norms.instance_layer_norm_affine` in fp32, returned in x's dtype. A third of the exact formula's passes
    over x, statistics in fp32 under autocast, and plain differentiable ops."""
    return instance_layer_norm_affine(x.float(), rho, gamma, beta, eps, correction).to(x.dtype)
