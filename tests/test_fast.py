"""The fast path (fused norms, its layout, fused Adam, bf16 autocast) against the exact path.

Two tolerances. The fast kernels in fp32 (autocast off): one step's gradients match the exact path to a median
relative error of 1e-5 per tensor; a few tensors fed by long sums (the AdaILN gamma/beta MLP) are ill-conditioned
in fp32 and differ by up to ~3e-3, as the exact fp32 path itself differs from a float64 evaluation there, so the
worst tensor is held to 1e-2. With bf16 autocast, outputs agree to a few percent and gradients to bf16 accuracy.
Gradients through the 1000-weighted CAM loss are sensitive: the exact formula under bf16 autocast already differs
from fp32 by a median ~7 % per tensor (up to ~70 % on the cancellation-dominated rho gradients), so the bf16 check
is on the median.
"""

import statistics

import pytest
import torch
from torch import nn

from ugatit.config import Config
from ugatit.models import Conv2d, Layers, ReflectionPad2d, build_networks
from ugatit.trainer import Trainer

BASE = Config(img_size=64, ch=8, n_res=2, light=True, global_layers=5, local_layers=4, lr=0.0, weight_decay=0.0)


def _pair(fast_dtype: str = "bfloat16"):
    torch.manual_seed(0)
    exact = Trainer(BASE)
    fast = Trainer(BASE.replace(precision="fast", fast_dtype=fast_dtype))
    for name, net in exact.nets.items():
        fast.nets[name].load_state_dict(net.state_dict())
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))
    return exact, fast, a, b


def _relative_grad_errors(exact_grads, fast_grads):
    assert exact_grads.keys() == fast_grads.keys() and exact_grads
    return {
        key: ((ref - fast_grads[key].float()).norm() / (ref.norm() + 1e-12)).item() for key, ref in exact_grads.items()
    }


def test_fast_kernels_in_fp32_match_the_exact_step(record_gradients):
    exact, fast, a, b = _pair("float32")  # fused norms and products, NCHW, fused Adam; fp32 arithmetic
    exact_grads, fast_grads = record_gradients(exact), record_gradients(fast)
    exact_terms, fast_terms = exact.train_step(a, b), fast.train_step(a, b)
    assert fast_terms["g_loss"] == pytest.approx(exact_terms["g_loss"], rel=1e-5)
    assert fast_terms["d_loss"] == pytest.approx(exact_terms["d_loss"], rel=1e-5)
    errors = _relative_grad_errors(exact_grads, fast_grads)
    assert statistics.median(errors.values()) <= 1e-5
    assert max(errors.values()) <= 1e-2, max(errors, key=errors.get)
    assert fast.memory_format == torch.contiguous_format  # fp32 on CPU: NCHW (precision.fast_memory_format)
    assert fast.nets["genA2B"].DownBlock[1].weight.is_contiguous()


@torch.no_grad()
def test_bf16_outputs_match_the_exact_path():
    exact, fast, a, _ = _pair()
    x = a.contiguous(memory_format=torch.channels_last)
    for name in ("genA2B", "disGA", "disLB"):
        reference = exact.nets[name].eval()(a)
        with fast.autocast():
            outputs = fast.nets[name].eval()(x)
        for ref, out in zip(reference, outputs, strict=True):
            assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
            assert ((ref - out.float()).norm() / ref.norm()).item() <= 0.03, name


def test_bf16_step_gradients_match_to_bf16_accuracy(record_gradients):
    exact, fast, a, b = _pair()
    exact_grads, fast_grads = record_gradients(exact), record_gradients(fast)
    exact_terms, fast_terms = exact.train_step(a, b), fast.train_step(a, b)
    assert fast_terms["g_loss"] == pytest.approx(exact_terms["g_loss"], rel=0.01)
    assert fast_terms["d_loss"] == pytest.approx(exact_terms["d_loss"], rel=0.01)
    errors = _relative_grad_errors(exact_grads, fast_grads)
    assert statistics.median(errors.values()) <= 0.3
    assert all(torch.isfinite(grad).all() for grad in fast_grads.values())


def test_fast_translator_matches_the_exact_one(tmp_path):
    import numpy as np

    from ugatit.checkpoint import save_model
    from ugatit.inference import Translator
    from ugatit.precision import native_bf16
    from ugatit.synthetic import make_sample

    torch.manual_seed(0)
    exact, _, _, _ = _pair()
    save_model(tmp_path / "g.safetensors", {"genA2B": exact.nets["genA2B"].state_dict()}, BASE)
    images = [make_sample("A", np.random.default_rng(i), 64)[0] for i in range(3)]
    reference = Translator.from_checkpoint(tmp_path / "g.safetensors")(images)
    auto = Translator.from_checkpoint(tmp_path / "g.safetensors", fast=True)
    assert auto.dtype == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    fast = Translator.from_checkpoint(tmp_path / "g.safetensors", fast=True, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    assert fast.generator.UpBlock1_1.norm1.norm.__name__ == "instance_layer_norm_fused"
    for ref, out in zip(reference, fast(images), strict=True):
        diff = np.abs(np.asarray(ref, dtype=np.int16) - np.asarray(out, dtype=np.int16))
        assert diff.mean() <= 3.0, diff.mean()
    fp32 = Translator.from_checkpoint(tmp_path / "g.safetensors", fast=True, dtype=torch.float32)
    for ref, out in zip(reference, fp32(images), strict=True):  # fp32 kernels: rounding only
        assert np.abs(np.asarray(ref, dtype=np.int16) - np.asarray(out, dtype=np.int16)).max() <= 1


def test_fast_rgb_output_layer_runs_nhwc_in_inference_and_matches_the_library_convolution(monkeypatch):
    import torch.nn.functional as F

    from ugatit.models import Conv2d

    layouts = []
    conv2d = F.conv2d

    def spy(x, *args, **kwargs):
        layouts.append("nhwc" if x.is_contiguous(memory_format=torch.channels_last) else "nchw")
        return conv2d(x, *args, **kwargs)

    torch.manual_seed(0)
    fast, exact = Conv2d(16, 3, 7, fast=True), nn.Conv2d(16, 3, 7, bias=False)
    exact.weight.data.copy_(fast.weight.data)
    x = torch.randn(2, 16, 30, 30)
    monkeypatch.setattr(F, "conv2d", spy)
    with torch.no_grad():
        out = fast(x)
        torch.testing.assert_close(out, exact(x), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()  # back in the NCHW layout that fp32 on a CPU keeps
    assert layouts == ["nhwc", "nchw"]
    fast(x.requires_grad_())  # with gradients (training under torch.compile), the library's layout
    assert layouts[-1] == "nchw"


def test_cli_translate_fast(tmp_path):
    from PIL import Image

    from ugatit.checkpoint import save_model
    from ugatit.cli import main

    exact, _, _, _ = _pair()
    save_model(tmp_path / "g.safetensors", {"genA2B": exact.nets["genA2B"].state_dict()}, BASE)
    Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "in.png")
    args = ["translate", str(tmp_path / "g.safetensors"), str(tmp_path / "in.png"), "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out"), "--fast"]) == 0
    assert Image.open(tmp_path / "out" / "in.png").size == (64, 64)
    assert main([*args, "--out", str(tmp_path / "o2"), "--fast", "--backend", "onnxruntime"]) == 2


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fast_discriminator_matches_the_exact_one_in_fp32(channels_last, training, calls):
    """Output scaling and the fused spectral-norm products (`_fast_conv`) against W / sigma: outputs, input and
    weight gradients, and the power iteration's u, v, over two calls (as in a D update). With `calls=2` the fast
    discriminator takes both batches in one call, which must equal the two consecutive calls."""
    from ugatit.models import Discriminator

    torch.manual_seed(0)
    exact = Discriminator(8, 5).train(training)
    fast = Discriminator(8, 5, fast=True).train(training)
    fast.load_state_dict(exact.state_dict())
    layout = torch.channels_last if channels_last else torch.contiguous_format
    fast.to(memory_format=layout)
    # 64 px: every layer takes the convolution branch; 40 px: the stride-1 conv (64 filters, 2 x 3 x 3 outputs,
    # 4 x 3 x 3 for two calls in one) and the 1x1 conv take the matrix-product branch.
    for size in (40, 64):
        xs = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
        xs_exact = [x.clone().requires_grad_() for x in xs]
        xs_fast = [x.clone().to(memory_format=layout).requires_grad_() for x in xs]
        outs_exact = [exact(x) for x in xs_exact]
        if calls == 1:
            outs_fast = [fast(x) for x in xs_fast]
        else:
            outs_fast = [out.split(2) for out in fast(torch.cat(xs_fast), calls=2)]
            outs_fast = list(zip(*outs_fast, strict=True))
        for out_exact, out_fast in zip(outs_exact, outs_fast, strict=True):
            sum(o.square().sum() for o in out_exact).backward()
            sum(o.square().sum() for o in out_fast).backward(retain_graph=True)
            for a, b in zip(out_exact, out_fast, strict=True):
                assert _relative(a, b) <= 1e-5
        for x_exact, x_fast in zip(xs_exact, xs_fast, strict=True):
            assert _relative(x_exact.grad, x_fast.grad) <= 1e-5
    for (key, p), q in zip(exact.named_parameters(), fast.parameters(), strict=True):
        assert _relative(p.grad, q.grad) <= 1e-5, key
    for (key, a), b in zip(exact.state_dict().items(), fast.state_dict().values(), strict=True):
        assert _relative(a, b) <= 1e-5, key


def _relative(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).norm() / reference.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_compiled_training_steps(precision):
    """`--compile`: discriminators run twice before one backward, so the spectral norms' saved vectors must survive
    the second call's power iteration also in compiled graphs (they did not, before sigma ran eagerly)."""
    torch.manual_seed(0)
    trainer = Trainer(BASE.replace(precision=precision, compile=True, lr=1e-4))
    a, b = (torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(2))
    for _ in range(2):
        terms = trainer.train_step(a, b)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert trainer.step == 2 and trainer.skipped == {"D": 0, "G": 0}


def test_reflection_padding_stays_in_bf16_under_autocast():
    """CPU autocast runs reflection padding in fp32 (a cast up, and a cast down at the next conv); ours pads in the
    input's dtype, with the same values, and is the only padding in the networks."""
    x = torch.randn(1, 4, 6, 6).to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ReflectionPad2d(2)(x)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours.float(), nn.ReflectionPad2d(2)(x.float()))
    pads = [m for net in build_networks(BASE).values() for m in net.modules() if isinstance(m, nn.ReflectionPad2d)]
    assert pads and all(type(m) is ReflectionPad2d for m in pads)


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
    "kernel,stride,padding,scale", [(3, 1, 1, None), (3, 2, 1, None), (7, 1, 3, None), (3, 1, 1, 2)]
)
def test_padded_convolution_is_the_layers_it_replaces_bit_for_bit(layout, autocast, kernel, stride, padding, scale):
    """The fast generator runs (upsample +) pad + conv as one node that keeps the unpadded input: the same output
    and gradients to the bit as the library's layers, under bf16 autocast too, and no larger copy kept."""
    torch.manual_seed(0)
    conv = Conv2d(16, 24, kernel, stride, fast=True).to(memory_format=layout)
    layers = [nn.Upsample(scale_factor=scale)] if scale else []
    layers = Layers(*layers, ReflectionPad2d(padding), conv)
    x0 = torch.randn(2, 16, 10, 10).to(autocast or torch.float32, memory_format=layout)
    results = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        conv.weight.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
            run = layers if fused else nn.Sequential(*layers)
            y, saved = _saved_bytes(lambda: run(x), conv.weight.shape)  # noqa: B023
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        results.append((y, x.grad, conv.weight.grad, sum(saved)))
    (y, grad_x, grad_w, saved), (y_f, grad_x_f, grad_w_f, saved_f) = results
    assert type(y_f.grad_fn).__name__ == "_PadConvBackward"
    assert y_f.dtype == y.dtype and torch.equal(y_f, y)
    assert torch.equal(grad_x_f, grad_x) and torch.equal(grad_w_f, grad_w)
    kept = x0.numel() * y.element_size()  # x in the convolution's dtype
    assert saved_f == kept < saved


def test_reflection_padding_keeps_only_the_shape_for_its_backward():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    ours, saved = _saved_bytes(lambda: ReflectionPad2d(3)(x))
    reference = nn.ReflectionPad2d(3)(x)
    grad = torch.randn_like(reference)
    assert not saved and torch.equal(ours, reference)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(reference, x, grad)[0])


@pytest.mark.parametrize("calls", [1, 2])
def test_fast_discriminator_keeps_bf16_activations_under_autocast(calls):
    """Dividing by sigma at the output must not promote bf16 activations to fp32 (twice the memory and traffic)."""
    from ugatit.models import Discriminator

    torch.manual_seed(0)
    disc = Discriminator(8, 5, fast=True)
    seen = []
    for layer in disc.model:
        if isinstance(layer, nn.LeakyReLU):
            layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, cam_logit, _ = disc(torch.randn(2 * calls, 3, 64, 64), calls=calls)  # 64 px: convolution branch only
    assert seen and set(seen) == {torch.bfloat16}
    assert out.dtype == cam_logit.dtype == torch.bfloat16


def test_fast_dtype_is_bf16_only_where_the_hardware_has_it():
    """bf16 is emulated, and several times slower than fp32, on CPUs without AMX/AVX512-BF16: "auto" must not pick
    it there. Explicit choices win; the exact path is fp32 whatever fast_dtype says."""
    from ugatit.precision import compute_dtype, native_bf16

    cpu_has_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert native_bf16("cpu") == cpu_has_bf16
    assert native_bf16("meta") is False
    fast = BASE.replace(precision="fast")
    assert compute_dtype(fast, "cpu") == (torch.bfloat16 if cpu_has_bf16 else torch.float32)
    assert compute_dtype(fast.replace(fast_dtype="bfloat16"), "cpu") == torch.bfloat16
    assert compute_dtype(fast.replace(fast_dtype="float32"), "cpu") == torch.float32
    assert compute_dtype(BASE.replace(fast_dtype="bfloat16"), "cpu") == torch.float32
    assert Trainer(fast).dtype == compute_dtype(fast, "cpu")


def test_fast_layout_is_channels_last_except_fp32_on_cpu(tmp_path):
    from ugatit.checkpoint import save_model
    from ugatit.inference import Translator
    from ugatit.precision import fast_memory_format

    assert fast_memory_format("cpu", torch.float32) == torch.contiguous_format
    assert fast_memory_format("cpu", torch.bfloat16) == torch.channels_last
    assert fast_memory_format("cuda", torch.float32) == torch.channels_last
    trainer = Trainer(BASE.replace(precision="fast", fast_dtype="bfloat16"))
    assert trainer.memory_format == torch.channels_last
    assert trainer.nets["genA2B"].DownBlock[1].weight.is_contiguous(memory_format=torch.channels_last)
    save_model(tmp_path / "g.safetensors", {"genA2B": trainer.nets["genA2B"].state_dict()}, BASE)
    for dtype, layout in ((torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)):
        translator = Translator.from_checkpoint(tmp_path / "g.safetensors", fast=True, dtype=dtype)
        assert translator.memory_format == layout
        assert translator.generator.DownBlock[1].weight.is_contiguous(memory_format=layout)


def test_fast_fp32_step_keeps_fp32_activations():
    """With fast_dtype float32 nothing runs in bf16: no autocast region is entered, outputs stay fp32."""
    _, fast, a, _ = _pair("float32")
    with fast.autocast():
        assert not torch.is_autocast_enabled("cpu")
        out = fast.nets["genA2B"](a.contiguous(memory_format=torch.channels_last))[0]
    assert out.dtype == torch.float32
