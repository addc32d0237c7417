"""Self-contained checks of the networks, norms, config and training step (no shared fixture needed)."""

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from ugatit.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    configs,
    min_image_size,
    model_config_from_dict,
    split_settings,
    to_dict,
)
from ugatit.losses import JUDGES, discriminator_losses
from ugatit.models import GENERATORS, Discriminator, ResnetGenerator, build_networks
from ugatit.norms import ILN, AdaILN
from ugatit.trainer import Trainer, learning_rate
from ugatit.tuning import release_free_heap


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (lambda: ResnetGenerator(64, 4, 256, light=False), 278_959_808),
        (lambda: ResnetGenerator(64, 4, 256, light=True), 10_589_888),
        (lambda: Discriminator(64, 7), 53_130_176),
        (lambda: Discriminator(64, 5), 3_290_560),
    ],
    ids=["full-generator", "light-generator", "global-D", "local-D"],
)
def test_parameter_counts_equal_official(module, expected):
    with torch.device("meta"):
        assert _count(module()) == expected


def test_output_shapes_at_256():
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        out, cam, heat = ResnetGenerator(8, 1, 256, light=True).eval()(x)
        assert out.shape == (2, 3, 256, 256) and cam.shape == (2, 2) and heat.shape == (2, 1, 64, 64)
        for layers, side in ((7, 6), (5, 30)):
            out, cam, heat = Discriminator(8, layers).eval()(x)
            assert out.shape == (2, 1, side, side) and cam.shape == (2, 2) and heat.shape == (2, 1, side + 1, side + 1)


def _reference_iln(x, rho, gamma, beta, eps=1e-5):
    """Paper eq. 1 in float64 numpy, with the unbiased variance of the official code."""
    x = x.double().numpy()
    mu_i = x.mean(axis=(2, 3), keepdims=True)
    var_i = x.var(axis=(2, 3), keepdims=True, ddof=1)
    mu_l = x.mean(axis=(1, 2, 3), keepdims=True)
    var_l = x.var(axis=(1, 2, 3), keepdims=True, ddof=1)
    mixed = rho * (x - mu_i) / np.sqrt(var_i + eps) + (1 - rho) * (x - mu_l) / np.sqrt(var_l + eps)
    return mixed * gamma + beta


def test_adailn_and_iln_equal_their_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6) * 3 + 1
    ada = AdaILN(5)
    ada.rho.data.uniform_(0, 1)
    gamma, beta = torch.randn(3, 5), torch.randn(3, 5)
    expected = _reference_iln(
        x,
        ada.rho.detach().double().numpy(),
        gamma.double().numpy()[:, :, None, None],
        beta.double().numpy()[:, :, None, None],
    )
    np.testing.assert_allclose(ada(x, gamma, beta).detach().numpy(), expected, rtol=1e-4, atol=1e-5)

    iln = ILN(5)
    for p in (iln.rho, iln.gamma, iln.beta):
        p.data.uniform_(0, 1)
    params = [p.detach().double().numpy() for p in (iln.rho, iln.gamma, iln.beta)]
    np.testing.assert_allclose(iln(x).detach().numpy(), _reference_iln(x, *params), rtol=1e-4, atol=1e-5)


def test_rho_initial_values():
    assert torch.all(AdaILN(4).rho == 0.9) and torch.all(ILN(4).rho == 0.0)


def _tiny_config(**changes):
    """(ModelConfig, RunConfig) of a tiny light model."""
    base = dict(img_size=32, ch=4, n_res=1, light=True, global_layers=4, local_layers=3, iterations=100)
    return configs(**{**base, **changes})


def test_rho_is_clipped_after_every_generator_update():
    torch.manual_seed(0)
    trainer = Trainer(*_tiny_config(lr=0.0))
    norms = [m for name in GENERATORS for m in trainer.nets[name].modules() if isinstance(m, (AdaILN, ILN))]
    for i, norm in enumerate(norms):
        norm.rho.data.fill_(1.7 if i % 2 else -0.4)
    trainer.train_step(torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1)
    for i, norm in enumerate(norms):
        assert torch.all(norm.rho == (1.0 if i % 2 else 0.0))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _heap_left_before_discriminator_update(release_heap: bool) -> list[int]:
    """Bytes that a heap release frees at the start of each step's D update (just before disGA's first call), on
    the heap as the trainer left it there: the last G update's activations are garbage by then."""
    torch.manual_seed(0)
    trainer = Trainer(*_tiny_config(img_size=64, ch=8, release_heap=release_heap))
    freed, armed = [], [False]

    def measure(module, args):
        if armed[0]:
            armed[0] = False
            before = _rss()
            assert release_free_heap()
            freed.append(before - _rss())

    handle = trainer.nets["disGA"].register_forward_pre_hook(measure)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    for _ in range(3):
        armed[0] = True
        trainer.train_step(x, x)
    handle.remove()
    assert len(freed) == 3
    return freed


@pytest.mark.skipif(not release_free_heap(), reason="the C library has no malloc_trim")
def test_cpu_step_hands_freed_heap_pages_back():
    """Each CPU step hands the heap's free pages back once, after the translations, when the last G update's
    activations are garbage: on this small model a release there returns 16-20 MiB from the second step on
    unless the trainer has just made it (release_heap=True), when it returns nothing."""
    released = _heap_left_before_discriminator_update(release_heap=True)
    kept = _heap_left_before_discriminator_update(release_heap=False)
    for step in (1, 2):
        assert released[step] < 2**20, released
        assert kept[step] > 8 * 2**20, kept


def test_learning_rate_schedule():
    config = RunConfig(iterations=1000, lr=2e-4)
    assert learning_rate(config, 1) == 2e-4
    assert learning_rate(config, 500) == 2e-4
    assert learning_rate(config, 501) == pytest.approx(2e-4 * (1 - 1 / 500))
    assert learning_rate(config, 750) == pytest.approx(1e-4)
    assert learning_rate(config, 1000) == 0.0
    assert learning_rate(dataclasses.replace(config, decay=False), 1000) == 2e-4


def test_learning_rate_equals_official_repeated_subtraction():
    config = RunConfig(iterations=20, lr=1e-4)
    lr = config.lr
    for step in range(1, 21):
        if step > 10:
            lr -= config.lr / 10
        assert learning_rate(config, step) == pytest.approx(lr, abs=1e-12)


def test_batch_of_two_equals_mean_of_two_single_batches(record_gradients):
    """All losses are means and all norms per sample, so a batch's gradient is the mean of the samples' ones."""
    torch.manual_seed(0)
    config = _tiny_config(lr=0.0, weight_decay=0.0)
    start = Trainer(*config)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for real_A, real_B in ((a, b), (a[:1], b[:1]), (a[1:], b[1:])):
        trainer = Trainer(*config, nets=copy.deepcopy(start.nets))
        grads.append(record_gradients(trainer))
        trainer.train_step(real_A, real_B)
    batch, first, second = grads
    for key, value in batch.items():
        mean = (first[key] + second[key]) / 2
        scale = max(mean.abs().max().item(), 1e-8)
        assert (value - mean).abs().max().item() <= 2e-4 * scale + 1e-7, key


def test_train_step_returns_every_term_and_changes_weights():
    torch.manual_seed(0)
    trainer = Trainer(*_tiny_config())
    before = copy.deepcopy(trainer.nets["genA2B"].state_dict())
    terms = trainer.train_step(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    for name in ("d_loss", "g_loss", "D_ad_loss_GA", "D_ad_cam_loss_LB", "G_recon_loss_A", "G_cam_loss_B", "lr"):
        assert np.isfinite(terms[name]), name
    assert terms["d_loss"] == pytest.approx(terms["D_loss_A"] + terms["D_loss_B"], rel=1e-6)
    assert trainer.step == 1
    after = trainer.nets["genA2B"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_generator_update_leaves_discriminator_gradients_alone(record_gradients):
    """The D gradients are exactly those of the D loss, and the G update's backward adds none to them."""
    torch.manual_seed(0)
    model, run = _tiny_config(lr=0.0)
    trainer = Trainer(model, run)
    copy_nets = copy.deepcopy(trainer.nets)
    real_A, real_B = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    grads = record_gradients(trainer)
    trainer.train_step(real_A, real_B)
    assert all(p.grad is None for net in trainer.nets.values() for p in net.parameters())

    real = {"A": real_A, "B": real_B}
    fake = {"A": copy_nets["genB2A"](real_B)[0].detach(), "B": copy_nets["genA2B"](real_A)[0].detach()}
    # Every discriminator judges the real batch, then the fake one: each call advances its power iteration.
    real_scores = {name: copy_nets[f"dis{name}"](real[domain]) for name, domain in JUDGES}
    fake_scores = {name: copy_nets[f"dis{name}"](fake[domain]) for name, domain in JUDGES}
    discriminator_losses(real_scores, fake_scores, run)["d_loss"].backward()
    for name in ("disGA", "disLB"):
        for (key, _), q in zip(trainer.nets[name].named_parameters(), copy_nets[name].parameters(), strict=True):
            assert torch.allclose(grads[f"{name}.{key}"], q.grad, rtol=1e-5, atol=1e-7), f"{name}.{key}"
        assert all(p.requires_grad for p in trainer.nets[name].parameters())


def test_image_too_small_for_discriminator_is_refused():
    with pytest.raises(ConfigError, match=r"img_size >= 96.*global_layers <= 6"):
        ModelConfig(img_size=64)
    assert min_image_size(7) == 96
    ModelConfig(img_size=64, global_layers=6, local_layers=5)


@pytest.mark.parametrize(
    "changes", [{"img_size": 30}, {"ch": 0}, {"precision": "bf16"}, {"fast_dtype": "fp16"}, {"local_layers": 2}]
)
def test_invalid_config_is_refused(changes):
    with pytest.raises(ConfigError):
        configs(**changes)


def test_config_round_trips_through_json():
    model, run = configs(img_size=128, light=True, cam_weight=500.0)
    assert model_config_from_dict(json.loads(json.dumps(to_dict(model)))) == model
    assert RunConfig(**json.loads(json.dumps(to_dict(run)))) == run
    # A file written before the split embedded every setting: its run settings are dropped.
    assert model_config_from_dict(json.loads(json.dumps({**to_dict(model), **to_dict(run)}))) == model
    assert split_settings({**to_dict(model), **to_dict(run)}) == (to_dict(model), to_dict(run))
    with pytest.raises(ConfigError, match="unknown setting"):
        model_config_from_dict({"img_sz": 3})
    with pytest.raises(ConfigError, match="unknown setting"):
        configs(img_sz=3)


def test_networks_are_built_with_official_names():
    nets = build_networks(_tiny_config()[0])
    assert list(nets) == ["genA2B", "genB2A", "disGA", "disGB", "disLA", "disLB"]


def test_update_with_non_finite_gradient_is_skipped_not_applied():
    torch.manual_seed(0)
    trainer = Trainer(*_tiny_config())
    weight = next(trainer.nets["genB2A"].parameters())
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    before = {n: copy.deepcopy(net.state_dict()) for n, net in trainer.nets.items()}
    terms = trainer.train_step(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    handle.remove()
    assert terms["skipped_G"] == 1.0 and terms["skipped_D"] == 0.0 and trainer.skipped == {"D": 0, "G": 1}
    for name in GENERATORS:
        after = trainer.nets[name].state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after if "rho" not in k)
    assert not torch.equal(before["disGA"]["conv1x1.weight"], trainer.nets["disGA"].state_dict()["conv1x1.weight"])
    terms = trainer.train_step(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert terms["skipped_G"] == 0.0
    assert all(torch.isfinite(p).all() for net in trainer.nets.values() for p in net.parameters())


def test_discriminators_update_per_domain_and_skip_only_the_domain_with_non_finite_gradients():
    torch.manual_seed(0)
    trainer = Trainer(*_tiny_config())
    weight = trainer.nets["disLB"].conv1x1.weight
    handle = weight.register_hook(lambda grad: grad * float("nan"))
    before = {n: copy.deepcopy(net.state_dict()) for n, net in trainer.nets.items()}
    terms = trainer.train_step(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    handle.remove()
    assert terms["skipped_D"] == 1.0 and trainer.skipped == {"D": 1, "G": 0}
    for name in ("disGB", "disLB"):  # domain B's update was left out as a whole (power iterations still ran)
        after = trainer.nets[name].state_dict()
        assert all(torch.equal(before[name][k], v) for k, v in after.items() if not k.endswith(("._u", "._v")))
    for name in ("disGA", "disLA"):  # domain A's went ahead
        assert not torch.equal(before[name]["conv1x1.weight"], trainer.nets[name].conv1x1.weight)
    assert all(torch.isfinite(p).all() for net in trainer.nets.values() for p in net.parameters())
