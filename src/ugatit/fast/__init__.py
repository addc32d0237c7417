"""The fast path: faster kernels swapped into built networks in place, the way diffusers swaps attention processors.

`apply(net)` takes a network of `ugatit.models` and replaces, module by module, how it computes, never what: the
parameters, buffers and state_dict keys stay those of the official networks, so a checkpoint loads the same into
either path and `remove(net)` (or `with exact(net):`) brings the exact computation back without a rebuild.

What `apply` swaps in:
* instance norms, ILN and AdaILN: fused one-pass kernels with an analytic backward (`fast/norms.py`); the TF
  architecture's ILN and AdaLIN (biased variances): their per-channel scale-and-shift form with fp32 statistics;
* every reflection pad: one that keeps its input's dtype under autocast and only its shape for the backward;
* the generators' pad + convolution (with the nearest upsampling before it): one node that keeps only its input,
  the upsampling stages as 2 x 2 convolutions of the small map (`subpixel.py`), the other large layers by Winograd
  in fp32 on CPUs where that pays (`convolution.py`, `winograd.py`);
* the discriminators' convolutions and CAM classifiers: spectral norm applied to the output, small outputs as a
  fused matrix product with the power iteration (oneDNN's inner product on a CPU), and stacked calls
  (`spectral.py`, `stacked`).

`Adam` is torch's fused Adam update without `torch.optim`, which would import the compiler (`fast/adam.py`).
`deferred_weight_grads()` leaves the discriminators' largest weight gradients as thin factors during a backward,
for an update that builds them one at a time (`DeferredGrads.step`).
`lean(net)` swaps in the pads alone: the same numbers to the last bit, less memory, for the exact path.
`grad_checkpoint(generator)` recomputes block insides in the backward instead of storing them (either path).
The compute dtype and memory layout that go with the fast path are in `fast/precision.py`; the trainer and the
translator apply all of this, and nothing else needs to know it exists.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .. import tf_models
from ..norms import EPS, ILN, AdaILN
from .adam import Adam
from .convolution import lean_pad, pad_conv
from .norms import Rectified, instance_layer_norm_fp32_affine, instance_layer_norm_fused, instance_norm_fused
from .precision import autocast, memory_format, native_bf16, resolve_dtype
from .spectral import DeferredGrads, deferred_weight_grads, is_spectral, spectral_conv, spectral_linear, stacked_calls

__all__ = [
    "Adam", "DeferredGrads", "apply", "autocast", "deferred_weight_grads", "exact", "grad_checkpoint", "is_fast",
    "lean", "memory_format", "native_bf16", "remove", "resolve_dtype", "stacked",
]  # fmt: skip


def _swap(module: nn.Module, forward: Callable) -> None:
    """Compute `module(...)` as `forward(module, ...)`; the module keeps its parameters and class."""
    module.forward = functools.partial(forward, module)


def _swapped(module: nn.Module) -> bool:
    return "forward" in module.__dict__


def _adailn(
    norm: AdaILN, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, rectify: bool = False
) -> torch.Tensor:
    gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
    return instance_layer_norm_fused(x, norm.rho, gamma, beta, norm.eps, rectify)


def _iln(norm: ILN, x: torch.Tensor, rectify: bool = False) -> torch.Tensor:
    return instance_layer_norm_fused(x, norm.rho, norm.gamma, norm.beta, norm.eps, rectify)


def _tf_adalin(norm: tf_models.AdaLIN, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    rho, gamma, beta = norm.mixing_ratio()[:, None, None], gamma[:, :, None, None], beta[:, :, None, None]
    return instance_layer_norm_fp32_affine(x, rho, gamma, beta, EPS, tf_models.CORRECTION)


def _tf_iln(norm: tf_models.LayerInstanceNorm, x: torch.Tensor) -> torch.Tensor:
    rho, gamma, beta = (p[:, None, None] for p in (norm.rho, norm.gamma, norm.beta))
    return instance_layer_norm_fp32_affine(x, rho, gamma, beta, EPS, tf_models.CORRECTION)


def _instance_norm(norm: nn.InstanceNorm2d, x: torch.Tensor, rectify: bool = False) -> torch.Tensor:
    return instance_norm_fused(x, norm.eps, rectify)


def _fused_norm(module: nn.Module) -> Callable | None:
    """The fused kernel's forward for `module`, or None: an affine or tracking InstanceNorm2d keeps the library's."""
    if isinstance(module, nn.InstanceNorm2d) and (module.affine or module.track_running_stats):
        return None
    return {AdaILN: _adailn, ILN: _iln, nn.InstanceNorm2d: _instance_norm}.get(type(module))


def _passthrough(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An upsampling or pad taken into the convolution after it (`pad_conv`), or a ReLU into the norm before it."""
    return x


def _adjacent(net: nn.Module) -> Iterator[tuple[nn.Module | None, nn.Module, nn.Module]]:
    """(the child before or None, child, next child) for every two consecutive children of `net`'s modules, in
    registration order, which is call order in the generators (their Sequentials and AdaILN blocks)."""
    for parent in net.modules():
        children = list(parent.children())
        for i in range(len(children) - 1):
            yield children[i - 1] if i > 0 else None, children[i], children[i + 1]


def _pad_conv_runs(net: nn.Module) -> Iterator[tuple[nn.Upsample | None, nn.ReflectionPad2d, nn.Conv2d]]:
    """(upsample or None, pad, conv) for every pad directly followed by a bias-free convolution (`_adjacent`)."""
    for before, pad, conv in _adjacent(net):
        if isinstance(pad, nn.ReflectionPad2d) and isinstance(conv, nn.Conv2d) and conv.bias is None:
            upsample = before if isinstance(before, nn.Upsample) and before.mode == "nearest" else None
            yield upsample, pad, conv


def lean(net: nn.Module) -> nn.Module:
    """Swap in reflection pads that keep only their input's shape (and dtype): the same numbers, less memory."""
    for module in net.modules():
        if isinstance(module, nn.ReflectionPad2d) and not _swapped(module):
            _swap(module, lean_pad)
    return net


def apply(net: nn.Module) -> nn.Module:
    """Swap every fast kernel into `net` (a generator or a discriminator of `ugatit.models`), in place. Earlier
    swaps are undone first, so `grad_checkpoint` goes after it."""
    remove(net)
    discriminator = _is_discriminator(net)
    if not discriminator:
        for upsample, pad, conv in _pad_conv_runs(net):
            for absorbed in (upsample, pad):
                if absorbed is not None:
                    _swap(absorbed, _passthrough)
            _swap(conv, functools.partial(_pad_conv, pad=pad, upsample=upsample))
    rectified = set()
    for _, norm, relu in _adjacent(net):
        if _fused_norm(norm) and type(relu) is nn.ReLU:
            rectified.add(norm)
            _swap(relu, _passthrough)
    for module in net.modules():
        if norm := _fused_norm(module):
            _swap(module, functools.partial(norm, rectify=module in rectified))
        elif isinstance(module, tf_models.AdaLIN):
            _swap(module, _tf_adalin)
        elif isinstance(module, tf_models.LayerInstanceNorm):
            _swap(module, _tf_iln)
        elif discriminator and isinstance(module, nn.Conv2d):
            _swap(module, spectral_conv)
        elif discriminator and isinstance(module, nn.Linear):
            _swap(module, spectral_linear)
    return lean(net)


def _pad_conv(conv: nn.Conv2d, x: torch.Tensor, pad: nn.ReflectionPad2d, upsample: nn.Upsample | None):
    return pad_conv(conv, pad, upsample, x)


def _is_discriminator(net: nn.Module) -> bool:
    return any(is_spectral(module) for module in net.modules())


def is_fast(net: nn.Module) -> bool:
    """Whether any fast kernel is swapped into `net` (the lean pads and gradient checkpointing alone do not count)."""
    return any(
        _swapped(m) and not isinstance(m, nn.ReflectionPad2d) and getattr(m.forward, "func", None) not in _RECOMPUTING
        for m in net.modules()
    )


def remove(net: nn.Module) -> nn.Module:
    """Undo `apply`, `lean` and `grad_checkpoint`: every module computes as its class says again."""
    for module in net.modules():
        if _swapped(module):
            del module.forward
    return net


@contextlib.contextmanager
def exact(net: nn.Module) -> Iterator[nn.Module]:
    """`net` computing exactly inside the block (for ONNX export: the fused kernels have no ONNX form), as it was
    after it."""
    saved = {module: module.__dict__["forward"] for module in net.modules() if _swapped(module)}
    remove(net)
    try:
        yield net
    finally:
        for module, forward in saved.items():
            module.forward = forward


def _segments(sequence: nn.Sequential, cuts: list[int]) -> list[nn.Module]:
    bounds = [0, *cuts, len(sequence)]
    return [sequence[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _recompute(forward: Callable, *args: torch.Tensor) -> torch.Tensor:
    """forward(*args), keeping of what its backward needs only the inputs: the backward runs it again, under the
    same autocast, for the rest, and lets each remade tensor go once it is used. torch.utils.checkpoint does the
    same but imports the compiler at its first call, which costs more memory than a small map's worth."""
    device = args[0].device.type
    autocast_now = torch.autocast(device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
    remade: list[torch.Tensor | None] = []
    count = itertools.count()

    def remake(index: int) -> torch.Tensor:
        if not remade:
            inputs = [a.detach().requires_grad_(a.requires_grad) for a in args]
            with (
                torch.enable_grad(),
                autocast_now,
                torch.autograd.graph.saved_tensors_hooks(remade.append, lambda _: None),
            ):
                forward(*inputs)
            if len(remade) != saved:  # the same code on the same inputs: only a bug could make them differ
                raise RuntimeError(f"recomputation saved {len(remade)} tensors where the forward saved {saved}")
        tensor, remade[index] = remade[index], None
        if tensor is None:
            raise RuntimeError("a recomputed tensor was asked for twice")
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(lambda _: next(count), remake):
        out = forward(*args)
    saved = next(count)
    return out


def _run_recomputed(segments: list[nn.Module], forward: Callable, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return forward(x)
    for segment in segments:  # segments never start with an in-place op, which would change their stored input
        x = Rectified.forget(_recompute(segment, x))
    return x


def _run_block_recomputed(forward: Callable, *args: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return forward(*args)
    return Rectified.forget(_recompute(forward, *args))


_RECOMPUTING = (_run_recomputed, _run_block_recomputed)  # the forwards `grad_checkpoint` swaps in


def grad_checkpoint(generator: nn.Module) -> nn.Module:
    """Gradient checkpointing of a generator, in place: only block boundaries are stored, and the insides are
    recomputed in the backward. The blocks, by their official names: the stem and downsampling layers as one,
    each residual block, each AdaILN block, each upsampling stage and the output layer. Off without gradients."""
    down, up = generator.DownBlock, generator.UpBlock2
    blocks = [i for i, layer in enumerate(down) if next(layer.children(), None) is not None]
    stages = [i for i, layer in enumerate(up) if isinstance(layer, nn.Upsample)] + [len(up) - 3]
    for sequence, cuts in ((down, blocks), (up, stages)):
        forward = sequence.forward
        sequence.forward = functools.partial(_run_recomputed, _segments(sequence, sorted(set(cuts) - {0})), forward)
    for i in range(generator.n_res):
        block = getattr(generator, f"UpBlock1_{i + 1}")
        block.forward = functools.partial(_run_block_recomputed, block.forward)
    return generator


def stacked(net: nn.Module, *inputs: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The outputs of `net` called on each input in turn, computed in one call on their concatenation (equal batch
    sizes): every layer works per sample, and the fast spectral norms advance once per input, as separate calls
    would. An exact discriminator, or one of the TF architecture, cannot: it would advance once for all."""
    iterating = any(is_spectral(m) or "u" in dict(m.named_buffers(recurse=False)) for m in net.modules())
    if iterating and not is_fast(net):
        raise ValueError("stacked calls of a discriminator need its fast layers (ugatit.fast.apply)")
    with stacked_calls(len(inputs)):
        outputs = net(torch.cat(inputs))
    return list(zip(*(output.chunk(len(inputs)) for output in outputs), strict=True))
