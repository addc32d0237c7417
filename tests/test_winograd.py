"""Winograd F(4x4, 3x3) convolutions (winograd.py) against the library's direct convolution, and where the fast
generator uses them."""

import pytest
import torch
import torch.nn.functional as F

from ugatit import winograd
from ugatit.config import Config
from ugatit.models import Conv2d, build_generator


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


def test_fast_generator_uses_winograd_and_matches_the_exact_one():
    """At 128 px with ch 64 the batched residual blocks go through Winograd; the fast generator's outputs and one
    backward's gradients stay within fp32 rounding of the exact generator's."""
    config = Config(img_size=128, ch=64, n_res=1, light=True)
    torch.manual_seed(0)
    exact = build_generator(config)
    fast = build_generator(config.replace(precision="fast"))
    fast.load_state_dict(exact.state_dict())
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    conv = fast.DownBlock[12].conv_block[1]
    assert isinstance(conv, Conv2d) and conv.fast
    outputs = [net(x) for net in (exact, fast)]
    # In training each pad and convolution run as one autograd node, which records the kernel it used.
    nodes = _graph_nodes(outputs[1][0].grad_fn)
    routes = [node.winograd for node in nodes if type(node).__name__ == "_PadConvBackward"]
    # 3 + 2 + 2 + 3 padded convolutions; Winograd in the residual blocks and the first upsampling layer
    assert len(routes) == 10 and sum(routes) == 5
    for ref, ours in zip(outputs[0], outputs[1], strict=True):
        assert _scale_error(ref, ours) <= 1e-4
    grads = []
    for net, (out, cam, _) in zip((exact, fast), outputs, strict=True):
        (out.square().mean() + cam.square().mean()).backward()
        grads.append({name: p.grad for name, p in net.named_parameters()})
    errors = {k: ((ref - grads[1][k]).norm() / (ref.norm() + 1e-12)).item() for k, ref in grads[0].items()}
    assert sorted(errors.values())[len(errors) // 2] <= 1e-4
    assert max(errors.values()) <= 1e-2, max(errors, key=errors.get)


def _graph_nodes(root) -> list:
    seen, stack = [], [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.append(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return seen
