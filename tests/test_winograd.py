"""Winograd F(4x4, 3x3) convolutions (fast/winograd.py) against the library's direct convolution, and where the
fast generator uses them."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from ugatit import fast
from ugatit.config import ModelConfig
from ugatit.fast import winograd
from ugatit.models import build_generator


def _scale_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 6, 6, 2), (2, 5, 11, 9, 4), (1, 8, 7, 18, 3), (3, 16, 34, 34, 8)],  # N, C_in, H, W (padded), C_out
)
def test_outputs_and_gradients_match_direct_convolution(shape):
    """Sizes that are and are not whole tiles (4 outputs + 2), batches, channel counts: outputs and both gradients
    within 3e-5 of their scale in fp32, and to 1e-12 in float64 (the transforms are exact in real arithmetic)."""
    n, c_in, height, width, c_out = shape
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 3e-5), (torch.float64, 1e-12)):
        x = torch.randn(n, c_in, height, width, generator=generator, dtype=dtype, requires_grad=True)
        w = torch.randn(c_out, c_in, 3, 3, generator=generator, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, c_out, height - 2, width - 2, generator=generator, dtype=dtype)
        reference = F.conv2d(x, w)
        ref_x, ref_w = torch.autograd.grad(reference, (x, w), grad)
        out = winograd.conv3x3(x, w)
        out_x, out_w = torch.autograd.grad(out, (x, w), grad)
        assert out.shape == reference.shape and out.is_contiguous()
        assert out_w.shape == w.shape and out_x.shape == x.shape
        for ref, ours in ((reference, out), (ref_x, out_x), (ref_w, out_w)):
            assert _scale_error(ref, ours) <= tolerance


def test_gradcheck():
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd.conv3x3, (x, w))


def test_only_large_fp32_cpu_layers_outside_autocast_pay():
    w = torch.zeros(256, 256, 3, 3)
    x = torch.zeros(2, 256, 34, 34)  # 2 x 8 x 8 = 128 tiles: the 128 px generator's batched residual blocks
    assert winograd.pays(x, w)
    assert not winograd.pays(x[:1], w)  # 64 tiles
    assert not winograd.pays(x.double(), w.double())
    assert not winograd.pays(torch.zeros(2, 128, 130, 130), torch.zeros(64, 128, 3, 3))  # too few channels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.pays(x, w)


def _step(net, x) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor], Counter]:
    """One forward and backward of `net` on x: its outputs, its parameters' gradients, and how many times the
    library's direct convolution ran forward and backward."""
    with profile() as prof:
        outputs = net(x)
        out, cam, _ = outputs
        (out.square().mean() + cam.square().mean()).backward()
    ops = Counter(event.name for event in prof.events())
    calls = Counter(forward=ops["aten::convolution"], backward=ops["aten::convolution_backward"])
    return tuple(t.detach() for t in outputs), {name: p.grad for name, p in net.named_parameters()}, calls


def test_fast_generator_uses_winograd_and_matches_the_exact_one():
    """At 128 px with ch 64 the batched residual blocks go through Winograd; the fast generator's outputs and one
    backward's gradients stay within fp32 rounding of the exact generator's."""
    config = ModelConfig(img_size=128, ch=64, n_res=1, light=True)
    torch.manual_seed(0)
    exact = build_generator(config)
    quick = build_generator(config)
    quick.load_state_dict(exact.state_dict())
    fast.apply(quick)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    (ref_outputs, ref_grads, ref_calls), (outputs, grads, calls) = (_step(net, x) for net in (exact, quick))
    # 3 + 2 + 2 + 3 padded convolutions and the CAM's 1 x 1 one; Winograd (batched matrix products instead of the
    # library's convolution, forward and backward) in the four residual-block convolutions. The upsampling stages
    # run as one library convolution each in their sub-pixel form (fast/subpixel.py), which beat Winograd there.
    assert ref_calls == Counter(forward=11, backward=11)
    assert calls == Counter(forward=7, backward=7)
    for ref, ours in zip(ref_outputs, outputs, strict=True):
        assert _scale_error(ref, ours) <= 1e-4
    assert ref_grads.keys() == grads.keys()
    errors = {k: ((ref - grads[k]).norm() / (ref.norm() + 1e-12)).item() for k, ref in ref_grads.items()}
    assert sorted(errors.values())[len(errors) // 2] <= 1e-4
    assert max(errors.values()) <= 1e-2, max(errors, key=errors.get)
