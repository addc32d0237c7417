"""Device names, and fp32 that stays fp32: cuDNN's TF32 default must not reach the exact path."""

import dataclasses

import numpy as np
import pytest
import torch

from ugatit.config import configs
from ugatit.devices import DeviceError, ieee_fp32, resolve_device
from ugatit.inference import Translator
from ugatit.synthetic import make_sample
from ugatit.train import sample_grids
from ugatit.trainer import Trainer

MODEL, RUN = configs(img_size=32, ch=4, n_res=1, light=True, global_layers=5, local_layers=4)


def _conv_tf32() -> bool:
    """Whether cuDNN may run fp32 convolutions in TF32, read through whichever API this PyTorch has."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return conv.fp32_precision == "tf32"
    return torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on(monkeypatch):
    """PyTorch's default for cuDNN (TF32 allowed), set explicitly so that the test does not depend on it."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        monkeypatch.setattr(conv, "fp32_precision", "tf32")
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert _conv_tf32()


def _watch(net: torch.nn.Module, seen: list[tuple[str, bool]]) -> None:
    """Record the TF32 flag at each forward of `net` and at each backward through its first output."""

    def hook(module, inputs, outputs):
        seen.append(("forward", _conv_tf32()))
        if outputs[0].requires_grad:
            outputs[0].register_hook(lambda grad: seen.append(("backward", _conv_tf32())))

    net.register_forward_hook(hook)


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            resolve_device("cuda")


def test_ieee_fp32_holds_tf32_off_inside_and_restores_it(tf32_on):
    with ieee_fp32():
        assert not _conv_tf32()
        with ieee_fp32():
            assert not _conv_tf32()
        assert not _conv_tf32()
    assert _conv_tf32()
    with pytest.raises(RuntimeError), ieee_fp32():
        raise RuntimeError
    assert _conv_tf32()


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_training_and_translation_never_run_in_tf32(tf32_on, precision, device):
    """Forward and backward of a training step, its sample grids and a translation, with TF32 allowed outside: none
    of them sees it."""
    run = dataclasses.replace(RUN, precision=precision)
    trainer = Trainer(MODEL, run, device)
    seen: list[tuple[str, bool]] = []
    for net in trainer.nets.values():
        _watch(net, seen)
    a, b = (torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(2))
    trainer.train_step(a, b)
    sample_grids(trainer, {"A": a, "B": b})
    translator = Translator(trainer.nets["genA2B"], MODEL, precision=precision)
    translator([make_sample("A", np.random.default_rng(0), 32)[0]])
    assert {kind for kind, _ in seen} == {"forward", "backward"}
    assert not any(tf32 for _, tf32 in seen)
    assert _conv_tf32()
