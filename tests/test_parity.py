"""Parity with the official PyTorch code on `official_tiny_light.pt` (fixtures/README.md defines the tolerances)."""

import pytest
import torch

from ugatit.models import NETWORKS, build_networks
from ugatit.official import infer_config, official_to_ours, ours_to_official
from ugatit.trainer import Trainer


def _networks(fixture):
    config = infer_config(fixture["init"], img_size=fixture["config"]["img_size"])
    config = config.replace(iterations=fixture["config"]["iteration"])
    states = official_to_ours(fixture["init"], config)
    nets = build_networks(config)
    for name, net in nets.items():
        net.load_state_dict(states[name])
    return config, nets


def test_fixture_config_is_inferred(official_fixture):
    config, _ = _networks(official_fixture)
    expected = official_fixture["config"]
    assert (config.ch, config.n_res, config.light) == (expected["ch"], expected["n_res"], expected["light"])
    assert (config.global_layers, config.local_layers) == (7, 5)


@torch.no_grad()
def test_eval_outputs_match(official_fixture):
    _, nets = _networks(official_fixture)
    probe = official_fixture["probe"]
    for name in NETWORKS:
        x = probe["x_A"] if name in ("genA2B", "disGA", "disLA") else probe["x_B"]
        outputs = nets[name].eval()(x)
        for field, value in zip(("out", "cam_logit", "heatmap"), outputs, strict=True):
            reference = probe[f"{name}.{field}"]
            assert value.shape == reference.shape
            assert (value - reference).abs().max().item() <= 1e-5, f"{name}.{field}"


def test_four_training_steps_match(official_fixture, two_threads):
    """Losses of each step and every final tensor, u and v included: 3 training-mode calls per discriminator per
    step advance the power iteration 12 times, and any other count would leave different vectors."""
    config, nets = _networks(official_fixture)
    trainer = Trainer(config, nets=nets)
    batches, losses = official_fixture["batches"], official_fixture["losses"]
    for k in range(4):
        terms = trainer.train_step(batches["real_A"][k], batches["real_B"][k])
        for name in ("d_loss", "g_loss"):
            reference = losses[name][k].item()
            assert abs(terms[name] - reference) <= 1e-5 * abs(reference), f"step {k + 1} {name}"
    final = ours_to_official({name: net.state_dict() for name, net in trainer.nets.items()}, config)
    for name in NETWORKS:
        assert final[name].keys() == official_fixture["final"][name].keys()
        for key, value in final[name].items():
            diff = (value - official_fixture["final"][name][key]).abs().max().item()
            assert diff <= 1e-5, f"{name}.{key} differs by {diff}"


@pytest.mark.parametrize("network", ["genA2B", "disLB"])
def test_fixture_round_trips_through_our_layout(official_fixture, network):
    config, nets = _networks(official_fixture)
    back = ours_to_official({name: net.state_dict() for name, net in nets.items()}, config)
    for key, value in official_fixture["init"][network].items():
        assert torch.equal(back[network][key], value)
