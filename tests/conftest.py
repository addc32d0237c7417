import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("UGATIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURE = SHARED / "reference" / "fixtures" / "official_tiny_light.pt"
HORSE2ZEBRA = SHARED / "datasets" / "horse2zebra"


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
)
def device(request) -> str:
    """The devices a test that takes `device` runs on: the CPU, and the GPU where PyTorch sees one (`-k cuda` picks
    the GPU runs: benchmarks/gpu_check.sh)."""
    return request.param


@pytest.fixture(scope="session")
def on_avx2_cpu():
    """`on_avx2_cpu(code, *args)` runs Python code on an emulated CPU with AVX2 and FMA and no AVX-512, VNNI or AMX
    (QEMU's user mode, CPU model Haswell, whose CPUID the libraries read to pick their kernels) and returns its
    standard output. Skips where there is no such emulator (Debian's qemu-user, which .ci/run installs)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the emulated AVX2 CPU is for x86-64 Linux")
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 (Debian's qemu-user, which .ci/run installs) is missing")
    from ugatit.fast.precision import ISA_CAPS

    env = {key: value for key, value in os.environ.items() if key not in ISA_CAPS}  # the emulated CPU's own flags

    def run(code: str, *args: str) -> str:
        command = ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code, *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


@pytest.fixture(scope="session")
def official_fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"parity fixture not found at {FIXTURE} (set UGATIT_SHARED to the shared/ folder)")
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def generators_64(tmp_path_factory):
    """A model file of two random light generators at 64 px: a small model for the commands that only translate."""
    from ugatit.checkpoint import save_model
    from ugatit.config import ModelConfig
    from ugatit.models import build_networks

    config = ModelConfig(img_size=64, ch=4, n_res=1, light=True, global_layers=5, local_layers=4)
    torch.manual_seed(0)
    nets = build_networks(config)
    path = tmp_path_factory.mktemp("generators_64") / "model.safetensors"
    save_model(path, {name: nets[name].state_dict() for name in ("genA2B", "genB2A")}, config)
    return path


@pytest.fixture
def two_threads():
    """The fixture was computed with 2 CPU threads; other counts change the last bits of the convolutions, which
    Adam's sign-like first steps magnify past the 1e-5 tolerance."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def record_gradients(monkeypatch):
    """`record(trainer)` returns a dict that fills, at each optimizer step, with the gradients the step applies,
    keyed "net.parameter": the trainer frees gradients right after each update. The fast path's largest
    discriminator gradients are built only in their update (`fast.DeferredGrads.step`): recorded there, built."""
    from ugatit import fast

    def record(trainer) -> dict[str, torch.Tensor]:
        grads: dict[str, torch.Tensor] = {}
        names = {p: f"{n}.{k}" for n, net in trainer.nets.items() for k, p in net.named_parameters()}

        def recorded(optimizer):
            step = optimizer.step

            def step_and_record(*args, **kwargs):
                for group in optimizer.param_groups:
                    grads.update({names[p]: p.grad.detach().clone() for p in group["params"] if p.grad is not None})
                return step(*args, **kwargs)

            return step_and_record

        for optimizer in (trainer.opt_D, trainer.opt_G):
            monkeypatch.setattr(optimizer, "step", recorded(optimizer))
        apply_deferred = fast.DeferredGrads.step

        def apply_and_record(deferred, optimizer):
            grads.update({names[w]: deferred.grad(w) for w in deferred.factors if w in names})
            apply_deferred(deferred, optimizer)

        monkeypatch.setattr(fast.DeferredGrads, "step", apply_and_record)
        return grads

    return record
