"""The fast path (`ugatit.fast`: fused norms, its layout, fused Adam, bf16 autocast) against the exact path.

Two tolerances. The fast kernels in fp32 (autocast off): one step's gradients match the exact path to a median
relative error of 1e-5 per tensor; a few tensors fed by long sums (the AdaILN gamma/beta MLP) are ill-conditioned
in fp32 and differ by up to ~3e-3, as the exact fp32 path itself differs from a float64 evaluation there, so the
worst tensor is held to 1e-2. With bf16 autocast, outputs agree to a few percent and gradients to bf16 accuracy.
Gradients through the 1000-weighted CAM loss are sensitive: the exact formula under bf16 autocast already differs
from fp32 by a median ~7 % per tensor (up to ~70 % on the cancellation-dominated rho gradients), so the bf16 check
is on the median.
"""

import contextlib
import copy
import dataclasses
import statistics
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ugatit import fast
from ugatit.checkpoint import list_checkpoints, save_model
from ugatit.config import configs
from ugatit.devices import ieee_fp32
from ugatit.fast.convolution import pad_conv
from ugatit.fast.norms import Rectified, instance_layer_norm_fused
from ugatit.inference import Translator
from ugatit.models import Discriminator, build_generator, build_networks
from ugatit.norms import ILN
from ugatit.synthetic import make_sample, write_dataset
from ugatit.trainer import Trainer

MODEL, RUN = configs(img_size=64, ch=8, n_res=2, light=True, global_layers=5, local_layers=4, lr=0.0, weight_decay=0.0)
FAST = dataclasses.replace(RUN, precision="fast")


def _pair(fast_dtype: str = "bfloat16", device: str = "cpu"):
    torch.manual_seed(0)
    exact = Trainer(MODEL, RUN, device)
    quick = Trainer(MODEL, dataclasses.replace(FAST, fast_dtype=fast_dtype), device)
    for name, net in exact.nets.items():
        quick.nets[name].load_state_dict(net.state_dict())
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))
    return exact, quick, a, b


def _relative_grad_errors(exact_grads, fast_grads):
    assert exact_grads.keys() == fast_grads.keys() and exact_grads
    return {
        key: ((ref - fast_grads[key].float()).norm() / (ref.norm() + 1e-12)).item() for key, ref in exact_grads.items()
    }


def _conv_weights(net: nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.dim() == 4]


def test_fast_kernels_in_fp32_match_the_exact_step(record_gradients, device):
    exact, quick, a, b = _pair("float32", device)  # fused norms and products, fused Adam; fp32 arithmetic
    exact_grads, fast_grads = record_gradients(exact), record_gradients(quick)
    exact_terms, fast_terms = exact.train_step(a, b), quick.train_step(a, b)
    assert fast_terms["g_loss"] == pytest.approx(exact_terms["g_loss"], rel=1e-5)
    assert fast_terms["d_loss"] == pytest.approx(exact_terms["d_loss"], rel=1e-5)
    errors = _relative_grad_errors(exact_grads, fast_grads)
    assert statistics.median(errors.values()) <= 1e-5
    assert max(errors.values()) <= 1e-2, max(errors, key=errors.get)
    layout = torch.contiguous_format if device == "cpu" else torch.channels_last  # NCHW for fp32 on a CPU only
    assert quick.memory_format == layout
    assert all(w.is_contiguous(memory_format=layout) for w in _conv_weights(quick.nets["genA2B"]))


@torch.no_grad()
def test_bf16_outputs_match_the_exact_path(device):
    exact, quick, a, _ = _pair(device=device)
    a = a.to(device)
    x = a.contiguous(memory_format=torch.channels_last)
    for name in ("genA2B", "disGA", "disLB"):
        with ieee_fp32():  # the exact path's fp32, as the trainer and the translator run it
            reference = exact.nets[name].eval()(a)
        with quick.autocast():
            outputs = quick.nets[name].eval()(x)
        for ref, out in zip(reference, outputs, strict=True):
            assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
            assert ((ref - out.float()).norm() / ref.norm()).item() <= 0.03, name


def test_bf16_step_gradients_match_to_bf16_accuracy(record_gradients, device):
    exact, quick, a, b = _pair(device=device)
    exact_grads, fast_grads = record_gradients(exact), record_gradients(quick)
    exact_terms, fast_terms = exact.train_step(a, b), quick.train_step(a, b)
    assert fast_terms["g_loss"] == pytest.approx(exact_terms["g_loss"], rel=0.01)
    assert fast_terms["d_loss"] == pytest.approx(exact_terms["d_loss"], rel=0.01)
    errors = _relative_grad_errors(exact_grads, fast_grads)
    assert statistics.median(errors.values()) <= 0.3
    assert all(torch.isfinite(grad).all() for grad in fast_grads.values())


def _images(count: int = 3):
    return [make_sample("A", np.random.default_rng(i), 64)[0] for i in range(count)]


def _pixel_diff(reference, output) -> np.ndarray:
    return np.abs(np.asarray(reference, dtype=np.int16) - np.asarray(output, dtype=np.int16))


def test_fast_translator_matches_the_exact_one(tmp_path, device):
    """The fast translator on `device` against the exact one on the CPU."""
    torch.manual_seed(0)
    exact, _, _, _ = _pair()
    path = tmp_path / "g.safetensors"
    save_model(path, {"genA2B": exact.nets["genA2B"].state_dict()}, MODEL)
    images = _images()
    reference = Translator.from_checkpoint(path)(images)
    auto = Translator.from_checkpoint(path, device=device, precision="fast")
    assert auto.precision == "fast"
    assert auto.dtype == (torch.bfloat16 if fast.native_bf16(device) else torch.float32)
    bf16 = Translator.from_checkpoint(path, device=device, precision="fast", fast_dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and fast.is_fast(bf16.generator)
    for ref, out in zip(reference, bf16(images), strict=True):
        diff = _pixel_diff(ref, out)
        assert diff.mean() <= 3.0, diff.mean()
    fp32 = Translator.from_checkpoint(path, device=device, precision="fast", fast_dtype="float32")
    for ref, out in zip(reference, fp32(images), strict=True):  # fp32 kernels: rounding only
        assert _pixel_diff(ref, out).max() <= 1
    on_device = Translator.from_checkpoint(path, device=device)  # the exact path on `device`
    for ref, out in zip(reference, on_device(images), strict=True):
        assert _pixel_diff(ref, out).max() <= 1


def test_fast_translator_of_a_built_generator_matches_the_exact_one():
    """`Translator(generator, ..., precision="fast")` swaps the fast kernels into the generator it is given."""
    torch.manual_seed(0)
    generators = [build_generator(MODEL) for _ in range(3)]
    for generator in generators[1:]:
        generator.load_state_dict(generators[0].state_dict())
    images = _images()
    exact = Translator(generators[0], MODEL)
    assert exact.precision == "exact" and exact.dtype == torch.float32 and not fast.is_fast(exact.generator)
    reference = exact(images)
    bf16 = Translator(generators[1], MODEL, precision="fast", fast_dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.memory_format == torch.channels_last
    assert fast.is_fast(generators[1])
    for ref, out in zip(reference, bf16(images), strict=True):
        diff = _pixel_diff(ref, out)
        assert diff.mean() <= 3.0, diff.mean()
    fp32 = Translator(generators[2], MODEL, precision="fast", fast_dtype="float32")
    assert fp32.dtype == torch.float32
    for ref, out in zip(reference, fp32(images), strict=True):  # fp32 kernels: rounding only
        assert _pixel_diff(ref, out).max() <= 1


@torch.no_grad()
def test_switching_precision_never_rebuilds_a_network():
    """`fast.apply` swaps kernels into the same modules: the same parameter objects, state_dict keys and tensors;
    `fast.remove` gives back the exact outputs bit for bit, and `fast.exact` does inside its block only."""
    torch.manual_seed(0)
    nets = build_networks(MODEL)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for name in ("genA2B", "disGA", "disLA"):
        net = nets[name].eval()  # eval: the spectral norms' power iterations hold still between calls
        reference = net(x)
        params = list(net.parameters())
        state = {key: value.clone() for key, value in net.state_dict().items()}
        assert fast.apply(net) is net and fast.is_fast(net)
        assert all(p is q for p, q in zip(net.parameters(), params, strict=True))
        after = net.state_dict()
        assert list(after) == list(state)
        assert all(torch.equal(after[key], value) for key, value in state.items())
        fast_outputs = net(x)
        for ref, out in zip(reference, fast_outputs, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

        assert fast.remove(net) is net and not fast.is_fast(net)
        assert all(torch.equal(out, ref) for out, ref in zip(net(x), reference, strict=True)), name

        fast.apply(net)
        with fast.exact(net) as inside:
            assert inside is net and not fast.is_fast(net)
            assert all(torch.equal(out, ref) for out, ref in zip(net(x), reference, strict=True)), name
        assert fast.is_fast(net)  # the fast kernels are back, computing what they did before the block
        assert all(torch.equal(out, ref) for out, ref in zip(net(x), fast_outputs, strict=True)), name


def test_fast_rgb_output_layer_runs_nhwc_in_inference_and_matches_the_library_convolution(monkeypatch):
    """In fp32 inference on a CPU the fast generator's RGB output layer (its last convolution, 3 output channels)
    runs in NHWC, as a library convolution of the same values; every other layer, and every layer with gradients,
    keeps the NCHW layout that fp32 on a CPU uses."""
    calls = []
    conv2d = F.conv2d

    def spy(x, weight, *args, **kwargs):
        out = conv2d(x, weight, *args, **kwargs)
        layout = "nhwc" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "nchw"
        calls.append((layout, x, weight, args, kwargs, out))
        return out

    torch.manual_seed(0)
    generator = fast.apply(build_generator(MODEL).eval())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    monkeypatch.setattr(F, "conv2d", spy)
    with torch.no_grad():
        out = generator(x)[0]
    layouts = [call[0] for call in calls]
    assert layouts[-1] == "nhwc" and layouts.count("nhwc") == 1, layouts
    _, x_rgb, weight, args, kwargs, rgb = calls[-1]
    assert weight.shape[0] == 3
    reference = conv2d(x_rgb.contiguous(), weight.contiguous(), *args, **kwargs)
    torch.testing.assert_close(rgb, reference, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()  # back in the NCHW layout that fp32 on a CPU keeps

    calls.clear()
    generator(x.requires_grad_())  # with gradients (training under torch.compile), the library's layout
    assert calls and calls[-1][0] == "nchw"


def _translate_args(tmp_path):
    from PIL import Image

    exact, _, _, _ = _pair()
    save_model(tmp_path / "g.safetensors", {"genA2B": exact.nets["genA2B"].state_dict()}, MODEL)
    Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "in.png")
    return ["translate", str(tmp_path / "g.safetensors"), str(tmp_path / "in.png"), "--no-progress", "--device", "cpu"]


def test_cli_translate_fast(tmp_path, capsys):
    from PIL import Image

    from ugatit.cli import main

    args = _translate_args(tmp_path)
    assert main([*args, "--out", str(tmp_path / "exact")]) == 0
    assert main([*args, "--out", str(tmp_path / "out"), "--precision", "fast", "--fast-dtype", "float32"]) == 0
    exact, quick = (Image.open(tmp_path / folder / "in.png") for folder in ("exact", "out"))
    assert quick.size == (64, 64)
    assert _pixel_diff(exact, quick).max() <= 1  # fp32 kernels: rounding only
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "o2"), "--precision", "fast", "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ugatit: error:") and err.count("\n") == 1 and "--precision fast" in err
    assert not (tmp_path / "o2").exists()


def test_cli_retired_fast_flag_names_its_new_spelling(tmp_path, capsys):
    """`translate --fast` (before --precision) is refused with the new spelling, not read as --fast-dtype."""
    from ugatit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*_translate_args(tmp_path), "--out", str(tmp_path / "out"), "--fast"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "ugatit translate: error: --fast is spelled --precision fast now"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fast_discriminator_matches_the_exact_one_in_fp32(channels_last, training, calls):
    """Output scaling and the fused spectral-norm products against W / sigma: outputs, input and weight gradients,
    and the power iteration's u, v, over two calls (as in a D update). With `calls=2` the fast discriminator takes
    both batches in one call (`fast.stacked`), which must equal the two consecutive calls."""
    torch.manual_seed(0)
    exact = Discriminator(8, 5).train(training)
    quick = Discriminator(8, 5).train(training)
    quick.load_state_dict(exact.state_dict())
    fast.apply(quick)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    quick.to(memory_format=layout)
    # 64 px: every layer takes the convolution branch; 40 px: the stride-1 conv (64 filters, 2 x 3 x 3 outputs,
    # 4 x 3 x 3 for two calls in one) and the 1x1 conv take the matrix-product branch.
    for size in (40, 64):
        xs = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
        xs_exact = [x.clone().requires_grad_() for x in xs]
        xs_fast = [x.clone().to(memory_format=layout).requires_grad_() for x in xs]
        outs_exact = [exact(x) for x in xs_exact]
        if calls == 1:
            outs_fast = [quick(x) for x in xs_fast]
        else:
            outs_fast = fast.stacked(quick, *xs_fast)
        for out_exact, out_fast in zip(outs_exact, outs_fast, strict=True):
            sum(o.square().sum() for o in out_exact).backward()
            sum(o.square().sum() for o in out_fast).backward(retain_graph=True)
            for a, b in zip(out_exact, out_fast, strict=True):
                assert _relative(a, b) <= 1e-5
        for x_exact, x_fast in zip(xs_exact, xs_fast, strict=True):
            assert _relative(x_exact.grad, x_fast.grad) <= 1e-5
    for (key, p), q in zip(exact.named_parameters(), quick.parameters(), strict=True):
        assert _relative(p.grad, q.grad) <= 1e-5, key
    for (key, a), b in zip(exact.state_dict().items(), quick.state_dict().values(), strict=True):
        assert _relative(a, b) <= 1e-5, key


def test_stacked_calls_need_a_fast_discriminator():
    """An exact discriminator would advance its power iterations once for all stacked inputs: refused."""
    disc = Discriminator(8, 4)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="fast"):
        fast.stacked(disc, x, x)
    outputs = fast.stacked(fast.apply(disc), x, x)
    assert len(outputs) == 2 and all(len(out) == 3 and out[0].shape[0] == 1 for out in outputs)


def _relative(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).norm() / reference.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_compiled_training_steps(precision, device):
    """`--compile`: discriminators run twice before one backward, so the spectral norms' saved vectors must survive
    the second call's power iteration also in compiled graphs (they did not, before sigma ran eagerly)."""
    torch.manual_seed(0)
    trainer = Trainer(MODEL, dataclasses.replace(RUN, precision=precision, compile=True, lr=1e-4), device)
    a, b = (torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(2))
    for _ in range(2):
        terms = trainer.train_step(a, b)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert trainer.step == 2 and trainer.skipped == {"D": 0, "G": 0}


def test_reflection_padding_stays_in_bf16_under_autocast(monkeypatch):
    """CPU autocast runs reflection padding in fp32 (a cast up, and a cast down at the next conv); the fast path's
    pads (and the lean ones of the exact path) pad in the input's dtype, with the same values, everywhere in the
    networks."""
    x = torch.randn(1, 4, 6, 6).to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fast.lean(nn.ReflectionPad2d(2))(x)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours.float(), nn.ReflectionPad2d(2)(x.float()))

    pad = F.pad
    padded = []  # (input dtype, output dtype) of every reflection pad

    def spy(input, padding, mode="constant", value=None):
        out = pad(input, padding, mode, value)
        if mode == "reflect":
            padded.append((input.dtype, out.dtype))
        return out

    monkeypatch.setattr(F, "pad", spy)
    torch.manual_seed(0)
    nets = build_networks(MODEL)
    image = torch.rand(2, 3, 64, 64).to(memory_format=torch.channels_last)
    bf16 = (torch.bfloat16, torch.bfloat16)
    for name, swap in (("genA2B", fast.apply), ("disGA", fast.apply), ("genB2A", fast.lean), ("disLA", fast.lean)):
        net = swap(nets[name])
        for grad in (False, True):
            padded.clear()
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                net(image)
            assert bf16 in padded and all(a == b for a, b in padded), (name, grad, padded)
        fast.remove(net)
        padded.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(image)  # the library's pads, for contrast: autocast casts bf16 inputs up
        assert (torch.bfloat16, torch.float32) in padded, name


def _saved_bytes(fn, weight_shape: tuple[int, ...] = ()) -> tuple[object, list[int]]:
    """fn()'s result and the sizes in bytes of the activations autograd saved for its backward (not parameters,
    nor their autocast copies, of `weight_shape`)."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter) and t.shape != weight_shape:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), saved


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("autocast", [None, torch.float32, torch.bfloat16])  # None: no autocast; else input dtype
@pytest.mark.parametrize(
    "kernel,stride,padding,scale", [(3, 1, 1, None), (3, 2, 1, None), (7, 1, 3, None), (5, 1, 2, 2)]
)
def test_padded_convolution_is_the_layers_it_replaces_bit_for_bit(layout, autocast, kernel, stride, padding, scale):
    """The fast generator runs (upsample +) pad + conv as one step that keeps the unpadded input: the same output
    and gradients to the bit as the library's layers, under bf16 autocast too, and no larger copy kept. (The
    generators' own upsampling stages, 3x3 after pad 1, take the sub-pixel form instead: tests/test_subpixel.py.)"""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, kernel, stride, 0, bias=False).to(memory_format=layout)
    upsample = [nn.Upsample(scale_factor=scale, mode="nearest")] if scale else []
    layers = nn.Sequential(*upsample, nn.ReflectionPad2d(padding), conv)  # as in the generator
    x0 = torch.randn(2, 16, 10, 10).to(autocast or torch.float32, memory_format=layout)
    results = []
    for swap in (fast.lean, fast.apply):  # the exact path's layers (lean pads, the library's conv), then the fast
        swap(layers)
        x = x0.clone().requires_grad_()
        conv.weight.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
            y, saved = _saved_bytes(lambda: layers(x), conv.weight.shape)  # noqa: B023
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        results.append((y, x.grad, conv.weight.grad, sum(saved)))
    (y, grad_x, grad_w, saved), (y_f, grad_x_f, grad_w_f, saved_f) = results
    assert y_f.dtype == y.dtype and torch.equal(y_f, y)
    assert torch.equal(grad_x_f, grad_x) and torch.equal(grad_w_f, grad_w)
    kept = x0.numel() * y.element_size()  # x in the convolution's dtype
    assert saved_f == kept < saved


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("scale", [None, 2])
def test_padded_convolution_after_a_rectified_norm_keeps_the_norms_input_instead(layout, autocast, scale):
    """conv(pad(relu(ILN(x)))) as the fast generator runs it: the convolution keeps the norm's input (kept by the
    norm anyway) rather than the rectified map and recomputes that map in its backward, so the layer keeps one map
    instead of two, with the same output and gradients to the bit as when the convolution keeps the map."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, 1, 0, bias=False).to(memory_format=layout)
    pad, upsample = nn.ReflectionPad2d(1), nn.Upsample(scale_factor=scale) if scale else None
    norm = ILN(16)
    nn.init.uniform_(norm.rho)
    x0 = torch.randn(2, 16, 10, 10).to(memory_format=layout)
    grad = torch.randn(2, 8, 10 * (scale or 1), 10 * (scale or 1))
    results = []
    for keep_map in (True, False):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        for p in (conv.weight, *norm.parameters()):
            p.grad = None

        def forward(keep_map=keep_map, x=x):
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                dtype = torch.bfloat16 if autocast else x.dtype
                rectified = instance_layer_norm_fused(x.to(dtype), norm.rho, norm.gamma, norm.beta, rectify=True)
                if keep_map:  # a copy carries no recipe: the convolution keeps the map itself
                    rectified = rectified.clone()
                return pad_conv(conv, pad, upsample, rectified)

        kept = {}  # storage -> bytes: a tensor both nodes keep counts once

        def pack(t: torch.Tensor, kept=kept) -> torch.Tensor:
            if not isinstance(t, nn.Parameter):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = forward()
        y.backward(grad.to(y.dtype))
        results.append((y, x.grad, conv.weight.grad, *(p.grad for p in norm.parameters()), sum(kept.values())))
    *kept_map, saved_map = results[0]
    *recomputed, saved_recipe = results[1]
    for a, b in zip(kept_map, recomputed, strict=True):
        assert torch.equal(a, b)
    element = 2 if autocast else 4
    assert saved_map - saved_recipe == x0.numel() * element  # one map fewer


def test_fast_generator_keeps_no_rectified_map_for_its_backward():
    """Every ReLU of the generators follows a norm: in the fast generator none of their outputs is kept for the
    backward (the next convolution recomputes it from the norm's input), where the exact layers keep each one."""
    generator = build_generator(MODEL)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    others = {generator.relu, *generator.FC}  # the CAM's and the MLP's ReLUs follow no norm
    after_norms = [m for m in generator.modules() if isinstance(m, nn.ReLU) and m not in others]
    assert len(after_norms) == 3 + 2 * MODEL.n_res + 2
    for swap, kept in ((fast.lean, True), (fast.apply, False)):
        swap(generator)
        rectified, saved = [], set()  # the maps themselves, held so that no address is reused
        hooks = [m.register_forward_hook(lambda _m, _i, out, kept=rectified: kept.append(out)) for m in after_norms]

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = generator(image)
        for hook in hooks:
            hook.remove()
        kept_maps = [r.untyped_storage().data_ptr() in saved for r in rectified]
        assert len(kept_maps) == len(after_norms) and all(kept_maps) == any(kept_maps) == kept, (swap, kept_maps)
        out[0].sum().backward()


def _held_across_generators(trainer: Trainer, a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """For each generator call of a step's G update (after the two translations), how many tensors saved for the
    backward by the other generator's G-update calls are still held when it starts."""
    calls: list[nn.Module] = []  # the generators in call order
    alive: weakref.WeakSet = weakref.WeakSet()
    held = []

    class Saved:  # what a graph holds for one saved tensor, with the generator call that saved it
        def __init__(self, tensor: torch.Tensor):
            self.tensor, self.call = tensor, len(calls) - 1
            alive.add(self)

    def enter(net, _args):
        if len(calls) >= 2:
            held.append(sum(saved.call >= 2 and calls[saved.call] is not net for saved in alive))
        calls.append(net)

    hooks = [trainer.nets[name].register_forward_pre_hook(enter) for name in ("genA2B", "genB2A")]
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        trainer.train_step(a, b)
    for hook in hooks:
        hook.remove()
    return held


@pytest.mark.parametrize("fast_dtype", ["float32", "bfloat16"])
def test_fast_generator_update_keeps_one_generators_graph_at_a_time(fast_dtype):
    """The fast G update backpropagates each generator's cycle and identity passes (one call on both batches)
    before the other generator's run: when that one starts, nothing the first saved for its backward is held. The
    exact update keeps every pass's graph until its one backward."""
    exact, quick, a, b = _pair(fast_dtype)
    assert _held_across_generators(quick, a, b) == [0, 0]
    held = _held_across_generators(exact, a, b)
    assert len(held) == 4 and min(held[1:]) > 0, held


def test_reflection_padding_keeps_only_the_shape_for_its_backward():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    ours, saved = _saved_bytes(lambda: fast.lean(nn.ReflectionPad2d(3))(x))
    reference = nn.ReflectionPad2d(3)(x)
    grad = torch.randn_like(reference)
    assert not saved and torch.equal(ours, reference)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(reference, x, grad)[0])


@pytest.mark.parametrize("calls", [1, 2])
def test_fast_discriminator_keeps_bf16_activations_under_autocast(calls):
    """Dividing by sigma at the output must not promote bf16 activations to fp32 (twice the memory and traffic)."""
    torch.manual_seed(0)
    disc = fast.apply(Discriminator(8, 5))
    seen = []
    for layer in disc.modules():
        if isinstance(layer, nn.LeakyReLU):
            layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    xs = [torch.randn(2, 3, 64, 64) for _ in range(calls)]  # 64 px: convolution branch only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = fast.stacked(disc, *xs) if calls > 1 else [disc(xs[0])]
    assert seen and set(seen) == {torch.bfloat16}
    for out, cam_logit, _ in outputs:
        assert out.dtype == cam_logit.dtype == torch.bfloat16


def test_fast_dtype_is_bf16_only_where_the_hardware_has_it():
    """bf16 is emulated, and several times slower than fp32, on CPUs without AMX/AVX512-BF16: "auto" must not pick
    it there. Explicit choices win; the exact path is fp32 whatever fast_dtype says."""
    cpu_has_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast.native_bf16("cpu") == cpu_has_bf16
    assert fast.native_bf16("meta") is False
    assert fast.resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_bf16 else torch.float32)
    assert fast.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert fast.resolve_dtype("float32", "cpu") == torch.float32
    assert Trainer(MODEL, dataclasses.replace(RUN, fast_dtype="bfloat16")).dtype == torch.float32
    assert Trainer(MODEL, FAST).dtype == fast.resolve_dtype("auto", "cpu")


def test_fast_dtype_auto_is_fp32_on_a_cpu_without_bf16_units(on_avx2_cpu):
    """On a CPU whose own flags say AVX2 and no AVX512-BF16 or AMX (emulated, no cap set), PyTorch dispatches its
    AVX2 kernels and "auto" resolves to fp32."""
    code = (
        "import torch, ugatit.fast\n"
        "print(torch.backends.cpu.get_cpu_capability(), ugatit.fast.resolve_dtype('auto', 'cpu'))"
    )
    assert on_avx2_cpu(code).split() == ["AVX2", "torch.float32"]


def test_fast_dtype_auto_is_fp32_where_onednn_is_capped_below_bf16(monkeypatch):
    """With oneDNN held to AVX2 a bf16 convolution is emulated even on a bf16 CPU, so "auto" must not pick bf16."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert fast.native_bf16("cpu") is False
    assert fast.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    cpu_has_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast.native_bf16("cpu") == cpu_has_bf16


def test_fast_layout_is_channels_last_except_fp32_on_cpu(tmp_path):
    assert fast.memory_format("cpu", torch.float32) == torch.contiguous_format
    assert fast.memory_format("cpu", torch.bfloat16) == torch.channels_last
    assert fast.memory_format("cuda", torch.float32) == torch.channels_last
    trainer = Trainer(MODEL, dataclasses.replace(FAST, fast_dtype="bfloat16"))
    assert trainer.memory_format == torch.channels_last
    weights = _conv_weights(trainer.nets["genA2B"])
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights if w.shape[2] > 1)
    save_model(tmp_path / "g.safetensors", {"genA2B": trainer.nets["genA2B"].state_dict()}, MODEL)
    for dtype, layout in (("float32", torch.contiguous_format), ("bfloat16", torch.channels_last)):
        translator = Translator.from_checkpoint(tmp_path / "g.safetensors", precision="fast", fast_dtype=dtype)
        assert translator.memory_format == layout
        weights = _conv_weights(translator.generator)
        assert all(w.is_contiguous(memory_format=layout) for w in weights if w.shape[2] > 1)
        with torch.no_grad(), fast.autocast("cpu", translator.dtype):
            out = translator.generator(torch.rand(1, 3, 64, 64).to(memory_format=layout))[0]
        assert out.is_contiguous(memory_format=layout)


def test_fast_fp32_step_keeps_fp32_activations():
    """With fast_dtype float32 nothing runs in bf16: no autocast region is entered, outputs stay fp32."""
    _, quick, a, _ = _pair("float32")
    with quick.autocast():
        assert not torch.is_autocast_enabled("cpu")
        out = quick.nets["genA2B"](a.contiguous(memory_format=torch.channels_last))[0]
    assert out.dtype == torch.float32


def _judged_twice(deferred: bool):
    """A fast global discriminator at 128 px (its deep layers in the product form) judged and updated by fused Adam
    from a fixed start: the deferred factors (or None), the gradients autograd left, and the updated weights."""
    torch.manual_seed(0)
    disc = fast.apply(Discriminator(16, 7))
    optimizer = fast.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second update runs on Adam moments the first one left
        with fast.deferred_weight_grads() if deferred else contextlib.nullcontext() as pending:
            scores = fast.stacked(disc, x[:1], x[1:])  # real and fake, as the D update judges them
            sum(out.square().mean() + cam.square().mean() for out, cam, _ in scores).backward()
        grads = {name: p.grad for name, p in disc.named_parameters()}
        factored = pending.factors if pending is not None else {}
        built = {name: pending.grad(p) for name, p in disc.named_parameters() if p in factored}
        assert pending is None or pending.finite()
        optimizer.step()
        optimizer.zero_grad()
        if pending is not None:
            pending.step(optimizer)
    return built, grads, {name: p.detach().clone() for name, p in disc.named_parameters()}, disc


def test_deferred_weight_gradients_are_the_ones_autograd_writes_and_update_the_same():
    """The discriminators' weight-bound layers can leave their weight gradients as thin factors, built one at a time
    in the update: bit for bit the gradients and the Adam update of the plain backward, in a fraction of the memory
    until then."""
    _, plain_grads, plain_weights, _ = _judged_twice(deferred=False)
    built, grads, weights, disc = _judged_twice(deferred=True)
    assert {"conv1x1.weight", "model.16.parametrizations.weight.original"} <= built.keys()  # the 512 x 1024 layers
    for name, grad in built.items():
        assert grads[name] is None and torch.equal(grad, plain_grads[name]), name
    for name, grad in grads.items():
        assert name in built or torch.equal(grad, plain_grads[name]), name
    assert all(torch.equal(weights[name], plain_weights[name]) for name in weights)
    assert all(p.grad is None for p in disc.parameters())


def test_deferred_update_block_by_block_is_adams_update_bit_for_bit():
    """Under the fast path's Adam, a deferred gradient is built and applied a block of rows at a time (a fresh
    full-size gradient costs more in page faults than its product): the same weights, moments and step count as
    torch's fused Adam stepping on the whole gradient, from the first step on and with a last block shorter than the
    others."""
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(300, 8192) * 0.1) for _ in range(2)]
    weights[1].data.copy_(weights[0].data)
    whole = torch.optim.Adam([weights[0]], lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4, fused=True)
    blocks = fast.Adam([weights[1]], lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    for step in range(3):
        a, b = torch.randn(10, 300) * 10.0**-step, torch.randn(10, 8192)
        weights[0].grad = a.t() @ b
        whole.step()
        weights[0].grad = None
        pending = fast.DeferredGrads()
        pending.add(weights[1], a[:4], b[:4])  # two calls' factors
        pending.add(weights[1], a[4:], b[4:])
        pending.step(blocks)
        assert weights[1].grad is None and not pending.factors
        assert torch.equal(weights[1], weights[0]), step
    assert all(torch.equal(blocks.state[weights[1]][key], whole.state[weights[0]][key]) for key in _ADAM_STATE)


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _adam_pair(fused: bool = True):
    """Two copies of the same parameters (a matrix, a vector, one left without gradients), one under torch's Adam
    (fused or its default), one under `fast.Adam`, with the same hyperparameters."""
    torch.manual_seed(0)
    params = [torch.randn(40, 30), torch.randn(30), torch.randn(5)]
    copies = [[nn.Parameter(p.clone()) for p in params] for _ in range(2)]
    options = {"lr": 2e-3, "betas": (0.5, 0.999), "weight_decay": 1e-4}
    return torch.optim.Adam(copies[0], fused=fused, **options), fast.Adam(copies[1], **options), copies


def _adam_steps(optimizers, copies, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator) for p in copies[0][:2]]
        for optimizer, params in zip(optimizers, copies, strict=True):
            for p, g in zip(params, grads, strict=False):
                p.grad = g.clone()
            optimizer.step()
            optimizer.zero_grad()


def test_fast_adam_is_torchs_fused_adam_bit_for_bit():
    """The fast path's Adam (which does not import the compiler) updates as torch.optim.Adam(fused=True) does, to the
    last bit, and writes the same state_dict."""
    torch_adam, ours, copies = _adam_pair()
    _adam_steps((torch_adam, ours), copies, steps=4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(*copies, strict=True))
    theirs, mine = torch_adam.state_dict(), ours.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys() == {0, 1}  # the third parameter never had a gradient
    for index, state in theirs["state"].items():
        assert mine["state"][index].keys() == state.keys()
        assert all(torch.equal(mine["state"][index][key], state[key]) for key in _ADAM_STATE)


@pytest.mark.parametrize("fused", [True, False])
def test_fast_adam_and_torchs_adam_load_each_others_state(fused):
    """A checkpoint moves between the exact path's optimizer (torch's default Adam) and the fast one either way, as
    `--precision` may change on resume: after loading, both go on with the same moments, steps and learning rate."""
    torch_adam, ours, copies = _adam_pair(fused)
    _adam_steps((torch_adam, ours), copies, steps=2, seed=1)
    torch_adam.param_groups[0]["lr"] = ours.param_groups[0]["lr"] = 1e-3  # as the decay sets it
    saved_torch, saved_ours = copy.deepcopy(torch_adam.state_dict()), copy.deepcopy(ours.state_dict())
    fresh_torch, fresh_ours, fresh = _adam_pair(fused)
    for params, trained in zip(fresh, copies, strict=True):
        for p, q in zip(params, trained, strict=True):
            p.data.copy_(q.data)
    fresh_ours.load_state_dict(saved_torch)  # torch's state into ours, and ours into torch's
    fresh_torch.load_state_dict(saved_ours)
    assert fresh_ours.param_groups[0]["lr"] == 1e-3 and fresh_torch.param_groups[0]["lr"] == 1e-3
    for optimizers in ((torch_adam, fresh_ours), (ours, fresh_torch)):
        params = [o.param_groups[0]["params"] for o in optimizers]
        _adam_steps(optimizers, params, steps=2, seed=2)
        for a, b in zip(*params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # fused and default Adam round differently
    with pytest.raises(ValueError, match="saved for other networks"):
        fast.Adam([nn.Parameter(torch.zeros(3))], lr=1e-3).load_state_dict(saved_torch)


def test_fast_adam_loads_moments_saved_in_the_other_memory_layout():
    """A checkpoint's moments saved beside contiguous weights go on with the same update for channels-last ones
    (and back): another dtype or device may change the weights' layout on resume, and the fused kernel pairs
    moments with weights by memory offset."""
    torch.manual_seed(0)
    weight = torch.randn(8, 6, 3, 3)
    grads = [torch.randn(8, 6, 3, 3) for _ in range(3)]
    layouts = (torch.contiguous_format, torch.channels_last)
    for saved_layout, loaded_layout in (layouts, layouts[::-1]):
        trained = nn.Parameter(weight.clone().contiguous(memory_format=saved_layout))
        optimizer = fast.Adam([trained], lr=0.1, betas=(0.5, 0.999))
        for g in grads[:2]:
            trained.grad = g.contiguous(memory_format=saved_layout)
            optimizer.step()
        saved = copy.deepcopy(optimizer.state_dict())
        resumed = nn.Parameter(trained.detach().clone().contiguous(memory_format=loaded_layout))
        reloaded = fast.Adam([resumed], lr=0.1, betas=(0.5, 0.999))
        reloaded.load_state_dict(saved)
        # Each gradient in its weight's layout, as autograd makes them.
        trained.grad = grads[2].contiguous(memory_format=saved_layout)
        resumed.grad = grads[2].contiguous(memory_format=loaded_layout)
        optimizer.step(), reloaded.step()
        torch.testing.assert_close(resumed.detach(), trained.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision,dtype", [("exact", "float32"), ("fast", "float32"), ("fast", "bfloat16")])
def test_gradient_checkpointing_takes_the_same_step_keeping_only_block_boundaries(record_gradients, precision, dtype):
    """`--grad-checkpoint` recomputes the generators' blocks in the backward: the same step to the bit, in either
    precision and under bf16 autocast. A boundary it keeps whole keeps nothing else: the rectified map entering the
    first residual block, which a fused norm made, carries no recipe there (the recipe holds the norm's input, a
    second map)."""
    steps, recipes = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        run = dataclasses.replace(RUN, precision=precision, fast_dtype=dtype, grad_checkpoint=recompute)
        trainer = Trainer(MODEL, run)
        assert fast.is_fast(trainer.nets["genA2B"]) == (precision == "fast")  # checkpointing is no fast kernel
        block = next(m for m in trainer.nets["genA2B"].DownBlock if next(m.children(), None) is not None)
        entering = []
        block.register_forward_pre_hook(lambda _, args, seen=entering: seen.append(Rectified.of(args[0])))
        grads = record_gradients(trainer)
        generator = torch.Generator().manual_seed(1)
        terms = trainer.train_step(*(torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2)))
        steps.append((terms, grads))
        recipes.append(any(recipe is not None for recipe in entering))
    (plain_terms, plain_grads), (recomputed_terms, recomputed_grads) = steps
    assert recomputed_terms == plain_terms
    assert plain_grads.keys() == recomputed_grads.keys() and plain_grads
    assert all(torch.equal(plain_grads[key], recomputed_grads[key]) for key in plain_grads)
    assert recipes == ([True, False] if precision == "fast" else [False, False])


def test_fast_training_does_not_import_the_compiler(tmp_path):
    """`ugatit train --precision fast`, a stop and a resume run without torch._dynamo (torch.optim would import it:
    start-up time, and memory at the step's peak), with `--grad-checkpoint` too (torch.utils.checkpoint would); the
    exact path's torch.optim.Adam still imports it."""
    data = write_dataset(tmp_path / "data", size=64, n_train=2, n_test=1, seed=0)
    code = "import sys; from ugatit.cli import main; code = main(sys.argv[1:]); print('torch._dynamo' in sys.modules)"
    for name, options, imported in (
        ("fast", ["--precision", "fast"], "False"),
        ("recomputed", ["--precision", "fast", "--grad-checkpoint"], "False"),
        ("exact", ["--precision", "exact"], "True"),
    ):
        run = ["train", str(data), "--run-dir", str(tmp_path / name), *options, "--img-size", "64", "--ch", "8",
               "--n-res", "1", "--light", "--global-layers", "5", "--local-layers", "4", "--sample-every", "1",
               "--no-progress"]  # fmt: skip
        for until in ("1", "2"):  # a new run, then a resume from its checkpoint
            args = [*run, "--iterations", "2", "--until", until]
            result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            assert result.stdout.split()[-1] == imported, (name, until)
        assert [step for step, _ in list_checkpoints(tmp_path / name)][-1] == 2


def test_deferred_gradients_report_non_finite_values_and_overflowing_products():
    weight = torch.zeros(4, 6)
    pending = fast.DeferredGrads()
    pending.add(weight, torch.ones(2, 4), torch.ones(2, 6))
    assert pending.finite()
    pending.add(weight, torch.full((2, 4), 1e30), torch.full((2, 6), 1e30))  # finite factors, product overflows
    assert not pending.finite()
    nan = fast.DeferredGrads()
    nan.add(weight, torch.tensor([[float("nan"), 0, 0, 0]]), torch.ones(1, 6))
    assert not nan.finite()
    large = fast.DeferredGrads()  # past the cheap bound, yet a finite product: built and checked
    large.add(weight, torch.tensor([[1e19, 0, 0, 0]]), torch.tensor([[2e19, 0, 0, 0, 0, 0]]))
    large.add(weight, torch.tensor([[0, 2e19, 0, 0]]), torch.tensor([[0, 1e19, 0, 0, 0, 0]]))
    assert large.finite() and large.grad(weight).max() == 2e38


def test_fast_trainer_skips_a_domain_whose_deferred_gradient_is_not_finite():
    """A NaN in domain B's D-update gradients, reaching a deferred weight gradient (the global B discriminator's 1 x 1
    convolution, in product form at 64 px with 6 layers), leaves domain B's discriminators as they were, deferred
    weights included, and updates domain A's. (The finite check of the factors alone: the test above.)"""
    model, run = configs(img_size=64, ch=8, n_res=1, light=True, global_layers=6, local_layers=4, precision="fast")
    torch.manual_seed(0)
    trainer = Trainer(model, run)
    real_A, real_B = (torch.rand(2, 3, 64, 64) for _ in range(2))
    conv = trainer.nets["disGB"].conv1x1
    probe = copy.deepcopy(trainer.nets["disGB"])
    with fast.deferred_weight_grads() as pending:
        sum(out.sum() for out, _, _ in fast.stacked(probe, real_B, real_B)).backward()
    assert probe.conv1x1.weight in pending.factors  # this layer's gradient is deferred in the D update

    def poison(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if module.weight.requires_grad:  # the D update's call, not the G update's (weights frozen there)
            out.register_hook(lambda grad: grad * float("nan"))

    nan_grad = conv.register_forward_hook(poison)
    before = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in trainer.nets.items()}
    terms = trainer.train_step(real_A, real_B)
    nan_grad.remove()
    assert terms["skipped_D"] == 1.0 and trainer.skipped == {"D": 1, "G": 0}
    for name in ("disGB", "disLB"):
        after = trainer.nets[name].state_dict()
        assert all(torch.equal(before[name][k], v) for k, v in after.items() if not k.endswith(("._u", "._v")))
    assert not torch.equal(before["disGA"]["conv1x1.weight"], trainer.nets["disGA"].conv1x1.weight)
    assert all(p.grad is None for net in trainer.nets.values() for p in net.parameters())
