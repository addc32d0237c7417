"""The fused ILN/AdaILN and InstanceNorm paths against the exact formulas: values, gradients, layouts, dtypes."""

import pytest
import torch
import torch.nn.functional as F

from ugatit.fast import norms as fast_norms
from ugatit.fast.norms import instance_layer_norm_fused, instance_norm_fused
from ugatit.norms import instance_layer_norm

SHAPES = [(1, 4, 8, 8), (3, 16, 8, 24), (1, 64, 40, 16), (3, 32, 64, 24), (3, 64, 16, 64), (1, 8, 64, 64)]


def make_inputs(shape, per_sample, channels_last=False, seed=0, dtype=torch.float32, device="cpu"):
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    # Per-channel offsets and scales, so that the instance and layer statistics differ.
    x = torch.randn(shape, generator=gen) * (0.5 + torch.rand(1, c, 1, 1, generator=gen) * 2)
    x = x + torch.randn(1, c, 1, 1, generator=gen)
    rows = b if per_sample else 1
    rho = torch.rand(1, c, 1, 1, generator=gen)
    gamma = 1 + 0.5 * torch.randn(rows, c, 1, 1, generator=gen)
    beta = torch.randn(rows, c, 1, 1, generator=gen)
    grad = torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    return [t.to(device, dtype) for t in (x, rho, gamma, beta, grad)]


def run(fn, x, rho, gamma, beta, grad):
    """Output and the gradients of x, rho, gamma, beta for the upstream gradient `grad`."""
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, rho, gamma, beta)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def rho_grad_scale(x, rho, gamma, grad, eps=1e-5):
    """Per-channel L1 size of the terms that d/d rho sums: the scale its rounding error is relative to."""
    x, gamma, grad = x.double(), gamma.double(), grad.double()
    x_in = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), keepdim=True) + eps)
    x_ln = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(x.var((1, 2, 3), keepdim=True) + eps)
    return (grad * gamma).abs().mul((x_in - x_ln).abs()).sum((0, 2, 3), keepdim=True)


def max_scaled_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["adailn", "iln"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_matches_exact(shape, per_sample, channels_last, device):
    x, rho, gamma, beta, grad = make_inputs(shape, per_sample, channels_last, device=device)
    exact = run(instance_layer_norm, x, rho, gamma, beta, grad)
    fused = run(instance_layer_norm_fused, x, rho, gamma, beta, grad)
    names = ["out", "x.grad", "rho.grad", "gamma.grad", "beta.grad"]
    for name, f, e in zip(names, fused, exact, strict=True):
        assert f.shape == e.shape and f.dtype == e.dtype, name
        assert torch.isfinite(f).all(), name
        if name == "rho.grad":
            # d/d rho sums g * gamma * (IN(x) - LN(x)): cancellation, so the error scales with the terms' size.
            atol = 1e-5 * rho_grad_scale(x, rho, gamma, grad).float()
            assert ((f - e).abs() <= atol).all(), (name, (f - e).abs().max().item())
        else:
            assert max_scaled_error(f, e) < 1e-5, (name, max_scaled_error(f, e))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert fused[0].is_contiguous(memory_format=memory_format)
    assert fused[1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("per_sample", [True, False], ids=["adailn", "iln"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_float64(per_sample, channels_last):
    x, rho, gamma, beta, _ = make_inputs((2, 3, 4, 5), per_sample, channels_last, seed=1, dtype=torch.float64)
    inputs = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, rho, gamma, beta)]
    assert torch.autograd.gradcheck(instance_layer_norm_fused, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float64_matches_exact_tightly():
    x, rho, gamma, beta, grad = make_inputs((3, 16, 12, 20), True, dtype=torch.float64)
    fused = run(instance_layer_norm_fused, x, rho, gamma, beta, grad)
    exact = run(instance_layer_norm, x, rho, gamma, beta, grad)
    for f, e in zip(fused, exact, strict=True):
        assert max_scaled_error(f, e) < 1e-11


@pytest.mark.parametrize("shape", [(1, 64, 32, 32), (3, 16, 24, 40)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bf16_close_to_fp32_exact(shape, channels_last):
    """bf16 input under autocast: bf16 output within bf16 rounding of the fp32 exact result for the same input.

    Stated tolerance: 1e-2 of the tensor's largest value for the output and grad x (a few bf16 roundings of
    values up to ~4x the typical one; measured 2-4e-3), 1e-5 for the parameter gradients (fp32 sums of exact bf16
    products; measured < 1e-6). The exact formula under autocast (bf16 statistics) is further off on all of them.
    """
    x, rho, gamma, beta, grad = make_inputs(shape, True, channels_last)
    x, grad = x.bfloat16(), grad.bfloat16()
    reference = run(instance_layer_norm, x.float(), rho, gamma, beta, grad.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(instance_layer_norm_fused, x, rho, gamma, beta, grad)
        autocast_exact = run(instance_layer_norm, x, rho, gamma, beta, grad)
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.bfloat16
    assert fused[2].dtype == fused[3].dtype == fused[4].dtype == torch.float32
    for i, tol in enumerate([1e-2, 1e-2, 1e-5, 1e-5, 1e-5]):
        if i == 2:
            err = ((fused[2] - reference[2]).abs() / rho_grad_scale(x, rho, gamma, grad).float()).max().item()
        else:
            err = max_scaled_error(fused[i], reference[i])
        assert err < tol, (i, err)
    for i in range(4):
        assert max_scaled_error(fused[i], reference[i]) < max_scaled_error(autocast_exact[i].float(), reference[i]), i


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_near_constant_channels(channels_last):
    """Channels with zero or tiny variance (<< eps): finite outputs and gradients, as close to the truth as the exact
    path's within 1e-4 of each tensor's largest value.

    Channel 1 has |mean| / std = 3e3: there the fp32 rounding of its mean (a few ulps of 0.3) is 1e-4 of its spread
    and moves every result of both paths; elsewhere both are within 1e-5.
    """
    x, rho, gamma, beta, grad = make_inputs((2, 8, 16, 16), True, channels_last)
    x = x.clone()
    x[:, 0] = 0.7  # constant
    x[:, 1] = 0.3 + 1e-4 * torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))  # var 1e-8 << eps
    x[1] = -1.25  # a whole constant sample: layer variance 0 too
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    truth = run(instance_layer_norm, *(t.double() for t in (x, rho, gamma, beta, grad)))
    exact = run(instance_layer_norm, x, rho, gamma, beta, grad)
    fused = run(instance_layer_norm_fused, x, rho, gamma, beta, grad)
    for i, (f, e, t) in enumerate(zip(fused, exact, truth, strict=True)):
        assert torch.isfinite(f).all(), i
        assert max_scaled_error(f, t) < 1e-4, (i, max_scaled_error(f, t))
        assert max_scaled_error(e, t) < 1e-4, (i, max_scaled_error(e, t))
    # Without the ill-conditioned channel 1: 1e-5 for NCHW. The channels_last statistics kernel accumulates the
    # channel sums in fp32 lanes, a few ulps off for a constant channel, and a * (x - mean) with a ~ 1 / sqrt(eps)
    # turns that into ~2e-5 of the output's range there.
    tol = 5e-5 if channels_last else 1e-5
    keep = [0, 2, 3, 4, 5, 6, 7]
    for i in (0, 1):
        assert max_scaled_error(fused[i][:, keep], exact[i][:, keep]) < tol, i
    assert max_scaled_error(fused[4], exact[4]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_device_generic_path(monkeypatch, dtype, channels_last):
    """The device-generic formulation that other devices (CUDA) run, exercised on CPU."""
    monkeypatch.setattr(fast_norms, "GENERIC_ON_CPU", True)
    x, rho, gamma, beta, grad = make_inputs((3, 16, 12, 20), True, channels_last)
    reference = run(instance_layer_norm, x.to(dtype).float(), rho, gamma, beta, grad.to(dtype).float())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fused = run(instance_layer_norm_fused, x.to(dtype), rho, gamma, beta, grad.to(dtype))
    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    loose = dtype == torch.bfloat16
    for i, tol in enumerate([1e-2, 1e-2, 1e-3, 1e-3, 1e-3] if loose else [1e-5] * 5):
        if i == 2:
            err = ((fused[2] - reference[2]).abs() / rho_grad_scale(x, rho, gamma, grad).float()).max().item()
        else:
            err = max_scaled_error(fused[i], reference[i])
        assert err < tol, (i, err)


def test_partial_requires_grad_and_no_grad():
    x, rho, gamma, beta, grad = make_inputs((1, 16, 8, 8), False)
    exact = run(instance_layer_norm, x, rho, gamma, beta, grad)
    xr = x.clone().requires_grad_()
    instance_layer_norm_fused(xr, rho, gamma, beta).backward(grad)
    assert max_scaled_error(xr.grad, exact[1]) < 1e-5
    gr = gamma.clone().requires_grad_()
    instance_layer_norm_fused(x, rho, gr, beta).backward(grad)
    assert max_scaled_error(gr.grad, exact[3]) < 1e-5
    with torch.no_grad():
        assert max_scaled_error(instance_layer_norm_fused(x, rho, gamma, beta), exact[0]) < 1e-5


def test_unsupported_shapes_fall_back_to_exact():
    x, rho, gamma, beta, grad = make_inputs((2, 4, 5, 5), True)
    torch.testing.assert_close(instance_layer_norm_fused(x, rho, 2.0, 0.5), instance_layer_norm(x, rho, 2.0, 0.5))
    x, rho, gamma, beta, grad = make_inputs((2, 4, 1, 1), True)  # one pixel: unbiased variance undefined, NaN
    with pytest.warns(UserWarning):
        fused = instance_layer_norm_fused(x, rho, gamma, beta)
        exact = instance_layer_norm(x, rho, gamma, beta)
    torch.testing.assert_close(fused, exact, equal_nan=True)


def test_non_contiguous_input_and_grad():
    x, rho, gamma, beta, grad = make_inputs((2, 8, 12, 10), True)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # neither NCHW- nor NHWC-contiguous
    exact = run(instance_layer_norm, x, rho, gamma, beta, grad)
    fused = run(instance_layer_norm_fused, x_t, rho, gamma, beta, grad.transpose(2, 3).contiguous().transpose(2, 3))
    for f, e in zip(fused, exact, strict=True):
        assert max_scaled_error(f, e) < 1e-5


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 16, 8, 24), (3, 64, 32, 16)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_instance_norm_matches_f_instance_norm(shape, channels_last):
    """Against F.instance_norm on NCHW copies: on this CPU build F.instance_norm itself returns a wrong grad x for
    a batch-1 channels_last input with a channels_last upstream gradient (torch 2.13; fine for batch > 1)."""
    x, _, _, _, grad = make_inputs(shape, True, channels_last)
    x[:, 0] = 0.5  # a constant channel
    results = []
    for fn, xs, gs in ((F.instance_norm, x.contiguous(), grad.contiguous()), (instance_norm_fused, x, grad)):
        xr = xs.clone(memory_format=torch.preserve_format).requires_grad_()
        out = fn(xr)
        out.backward(gs)
        results.append((out, xr.grad))
    (e_out, e_grad), (f_out, f_grad) = results
    assert max_scaled_error(f_out, e_out) < 1e-5 and max_scaled_error(f_grad, e_grad) < 1e-5
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert f_out.is_contiguous(memory_format=memory_format) and f_grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_instance_norm_gradcheck_and_bf16(channels_last):
    x, _, _, _, grad = make_inputs((2, 3, 4, 5), True, channels_last, dtype=torch.float64)
    assert torch.autograd.gradcheck(instance_norm_fused, [x.clone().requires_grad_()], eps=1e-6, atol=1e-7)
    x, _, _, _, grad = make_inputs((2, 16, 16, 24), True, channels_last)
    ref_in, ref_grad_out = x.bfloat16().float().contiguous(), grad.bfloat16().float().contiguous()
    ref_out, ref_grad = run(lambda t, *_: F.instance_norm(t), ref_in, x, x, x, ref_grad_out)[:2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, x_grad = run(lambda t, *_: instance_norm_fused(t), x.bfloat16(), x, x, x, grad.bfloat16())[:2]
    assert out.dtype == x_grad.dtype == torch.bfloat16
    assert max_scaled_error(out, ref_out) < 1e-2 and max_scaled_error(x_grad, ref_grad) < 1e-2


NORMS = {
    "adailn": lambda x, rho, gamma, beta, **k: instance_layer_norm_fused(x, rho, gamma, beta, **k),
    "iln": lambda x, rho, gamma, beta, **k: instance_layer_norm_fused(x, rho, gamma[:1], beta[:1], **k),
    "in": lambda x, rho, gamma, beta, **k: instance_norm_fused(x, **k),
}
EXACT_NORMS = {
    "adailn": lambda x, rho, gamma, beta: instance_layer_norm(x, rho, gamma, beta),
    "iln": lambda x, rho, gamma, beta: instance_layer_norm(x, rho, gamma[:1], beta[:1]),
    "in": lambda x, rho, gamma, beta: F.instance_norm(x.contiguous()),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rectify", [False, True], ids=["norm", "norm+relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_every_norm_on_the_device_generic_path(monkeypatch, norm, rectify, channels_last):
    """What CUDA runs for each norm (the device-generic formulation, exercised on the CPU), alone and with the ReLU
    taken in, against the exact norm: output and every gradient, fp32."""
    monkeypatch.setattr(fast_norms, "GENERIC_ON_CPU", True)
    x, rho, gamma, beta, grad = make_inputs((3, 16, 12, 20), True, channels_last)
    relu = F.relu if rectify else (lambda t: t)
    fused = run(lambda *t: NORMS[norm](*t, rectify=rectify), x, rho, gamma, beta, grad)
    exact = run(lambda *t: relu(EXACT_NORMS[norm](*t)), x, rho, gamma, beta, grad)
    for name, f, e in zip(["out", "x.grad", "rho.grad", "gamma.grad", "beta.grad"], fused, exact, strict=True):
        if e is None:  # IN has no parameters
            assert f is None, name
        elif name == "rho.grad":
            assert ((f - e).abs() <= 1e-5 * rho_grad_scale(x, rho, gamma, grad)).all(), name
        else:
            assert max_scaled_error(f, e) < 1e-5, (name, max_scaled_error(f, e))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-11)], ids=["fp32", "fp64"])
def test_rectified_norms_are_the_norm_then_a_relu(norm, channels_last, dtype, tolerance):
    """`rectify=True` (a norm with the ReLU after it taken in) against the exact norm followed by F.relu: output and
    every gradient, with the ReLU's input recomputed in the backward; the output can be made again bit for bit from
    the recipe it carries; without autograd recording, the same function."""
    x, rho, gamma, beta, grad = make_inputs((3, 16, 12, 20), True, channels_last, dtype=dtype)
    fused = run(lambda *t: NORMS[norm](*t, rectify=True), x, rho, gamma, beta, grad)
    exact = run(lambda *t: F.relu(EXACT_NORMS[norm](*t)), x, rho, gamma, beta, grad)
    assert (fused[0] == 0).float().mean() > 0.2  # the ReLU clips a good share
    for name, f, e in zip(["out", "x.grad", "rho.grad", "gamma.grad", "beta.grad"], fused, exact, strict=True):
        if e is None:  # IN has no parameters
            assert f is None, name
        elif name == "rho.grad":
            atol = tolerance * rho_grad_scale(x, rho, gamma, grad).to(dtype)
            assert ((f - e).abs() <= atol).all(), (name, (f - e).abs().max().item())
        else:
            assert f.dtype == e.dtype and max_scaled_error(f, e) < tolerance, (name, max_scaled_error(f, e))
    leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
    out = NORMS[norm](leaf, rho, gamma, beta, rectify=True)
    assert torch.equal(fast_norms.Rectified.of(out).recompute(), out)
    with torch.no_grad():  # unrecorded, the ReLU runs in place on the norm's usual output
        assert max_scaled_error(NORMS[norm](x, rho, gamma, beta, rectify=True), exact[0]) < tolerance


def test_a_rectified_output_changed_in_place_is_convolved_as_it_is_now():
    """A convolution after a rectified norm keeps the norm's recipe instead of its output, unless that output was
    changed in place since: the recipe would remake the old values, and the weight's gradient would be wrong."""
    from torch import nn

    from ugatit.fast.convolution import pad_conv

    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    conv, pad = nn.Conv2d(8, 4, 3, bias=False).double(), nn.ReflectionPad2d(1)
    grads = []
    for fast in (True, False):
        leaf = x.clone().requires_grad_()
        if fast:
            out = instance_norm_fused(leaf, rectify=True).mul_(2.0)
        else:  # out of place: the ReLU's backward needs its output
            out = F.relu(F.instance_norm(leaf, eps=1e-5)).mul(2.0)
        y = pad_conv(conv, pad, None, out) if fast else conv(pad(out))
        grads.append(torch.autograd.grad(y.square().sum(), (leaf, conv.weight)))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", NORMS)
def test_rectified_norms_gradcheck_and_bf16(norm):
    x, rho, gamma, beta, grad = make_inputs((2, 3, 4, 5), True, True, seed=1, dtype=torch.float64)
    inputs = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, rho, gamma, beta)]
    assert torch.autograd.gradcheck(lambda *t: NORMS[norm](*t, rectify=True), inputs, eps=1e-6, atol=1e-7)
    x, rho, gamma, beta, grad = make_inputs((2, 16, 16, 24), True, True)
    ref = run(lambda *t: F.relu(EXACT_NORMS[norm](*t)), x.bfloat16().float(), rho, gamma, beta, grad)
    ours = run(lambda *t: NORMS[norm](*t, rectify=True), x.bfloat16(), rho, gamma, beta, grad.bfloat16())
    assert ours[0].dtype == ours[1].dtype == torch.bfloat16
    assert max_scaled_error(ours[0], ref[0]) < 1e-2 and max_scaled_error(ours[1], ref[1]) < 2e-2
    out = NORMS[norm](x.bfloat16().requires_grad_(), rho, gamma, beta, rectify=True)
    assert torch.equal(fast_norms.Rectified.of(out).recompute(), out)
