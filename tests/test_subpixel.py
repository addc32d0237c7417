"""The generators' upsampling stages (nearest 2x, reflection pad 1, 3x3 convolution) in the fast path's sub-pixel
form (fast/subpixel.py), against the library's three layers."""

import pytest
import torch
from torch import nn

from ugatit import fast


def _stage(c_in: int, c_out: int, layout: torch.memory_format, dtype: torch.dtype) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, 1, 0, bias=False).to(dtype=dtype, memory_format=layout)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), conv)


def _run(stage: nn.Sequential, x0: torch.Tensor, grad_seed: int = 1):
    """Output, input gradient and weight gradient of one forward + backward, and the no-grad output."""
    x = x0.clone().requires_grad_()
    conv = stage[2]
    conv.weight.grad = None
    y = stage(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    y.backward(grad.to(y.dtype))
    with torch.no_grad():
        inference = stage(x0)
    return y.detach(), x.grad, conv.weight.grad, inference


def _scale_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference.double() - other.double()).abs().max() / reference.double().abs().max()).item()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1, 2), (2, 16, 7, 9, 24), (1, 32, 12, 5, 8)])  # N, C_in, H, W, C_out
def test_subpixel_stage_is_the_library_layers(layout, shape):
    """Forward (with and without gradients), input and weight gradients: to 1e-12 of their scale in float64 (the
    form is exact in real arithmetic), to 3e-6 in fp32, with the output in the input's layout."""
    n, c_in, height, width, c_out = shape
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 3e-6)):
        torch.manual_seed(0)
        stage = _stage(c_in, c_out, layout, dtype)
        x0 = torch.randn(n, c_in, height, width, dtype=dtype).contiguous(memory_format=layout)
        reference = _run(fast.lean(stage), x0)
        ours = _run(fast.apply(stage), x0)
        for ref, out in zip(reference, ours, strict=True):
            assert out.shape == ref.shape and out.dtype == ref.dtype
            assert _scale_error(ref, out) <= tolerance
        assert ours[0].is_contiguous(memory_format=layout)


def test_subpixel_stage_under_bf16_autocast_stays_within_bf16_rounding():
    """Under autocast both forms convolve in bf16: the sub-pixel one (pairs of weights summed before rounding)
    stays as close to the fp32 result as the library's layers are."""
    torch.manual_seed(0)
    stage = _stage(32, 16, torch.channels_last, torch.float32)
    x0 = torch.randn(2, 32, 10, 10).contiguous(memory_format=torch.channels_last)
    exact = _run(fast.lean(stage), x0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        library = _run(fast.lean(stage), x0)
        ours = _run(fast.apply(stage), x0)
    assert ours[0].dtype == library[0].dtype == torch.bfloat16
    for ref, lib, out in zip(exact, library, ours, strict=True):
        assert _scale_error(ref, out) <= max(2 * _scale_error(ref, lib), 1e-2)


def test_subpixel_stage_keeps_only_its_input_for_the_backward():
    """No upsampled or padded copy is kept: only x, as the other fast padded convolutions."""
    stage = fast.apply(_stage(8, 4, torch.contiguous_format, torch.float32))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(x)
    assert sum(saved) == x.numel()


def test_gradcheck():
    stage = fast.apply(_stage(3, 2, torch.contiguous_format, torch.float64))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stage, (x,))
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(stage, {"2.weight": w}, (x,)),
                                    (stage[2].weight.detach().clone().requires_grad_(),))  # fmt: skip
