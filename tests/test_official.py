"""Official checkpoint interop: round trips, architecture inference, and every refused-file case."""

import pickle
import subprocess
import sys

import pytest
import torch

from ugatit.checkpoint import CheckpointError, load_model
from ugatit.cli import main
from ugatit.config import ModelConfig
from ugatit.models import NETWORKS, build_networks
from ugatit.official import load_official, ours_to_official


def _official_file(tmp_path, config, mutate=None, name="official.pt"):
    torch.manual_seed(0)
    states = {name: net.state_dict() for name, net in build_networks(config).items()}
    official = ours_to_official(states, config)
    if mutate:
        mutate(official)
    path = tmp_path / name
    torch.save(official, path)
    return path, official


LIGHT = ModelConfig(img_size=32, ch=4, n_res=2, light=True, global_layers=4, local_layers=3)
FULL = ModelConfig(img_size=16, ch=2, n_res=1, light=False, global_layers=3, local_layers=3)


@pytest.mark.parametrize("config", [LIGHT, FULL], ids=["light", "full"])
def test_import_export_reload_gives_identical_tensors(tmp_path, config):
    path, official = _official_file(tmp_path, config)
    assert (
        main(
            ["import-official", str(path), "--out", str(tmp_path / "ours.safetensors"), "--img-size", "32"]
            if config.light
            else ["import-official", str(path), "--out", str(tmp_path / "ours.safetensors")]
        )
        == 0
    )
    loaded_config, _ = load_model(tmp_path / "ours.safetensors")
    assert (loaded_config.ch, loaded_config.n_res, loaded_config.light, loaded_config.img_size) == (
        config.ch,
        config.n_res,
        config.light,
        config.img_size,
    )
    assert main(["export-official", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.keys() == official.keys()
    for name in NETWORKS:
        assert list(back[name]) == list(official[name])
        for key, value in official[name].items():
            assert torch.equal(back[name][key], value), f"{name}.{key}"


def test_fixture_import_export_round_trip(official_fixture, tmp_path):
    path = tmp_path / "init.pt"
    torch.save(official_fixture["init"], path)
    assert main(["import-official", str(path), "--out", str(tmp_path / "m.safetensors"), "--img-size", "128"]) == 0
    assert main(["export-official", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for name in NETWORKS:
        for key, value in official_fixture["init"][name].items():
            assert torch.equal(back[name][key], value), f"{name}.{key}"


def test_pre_2019_08_07_mlp_key_is_accepted(tmp_path):
    def rename(official):
        for gen in ("genA2B", "genB2A"):
            official[gen]["FC.1.weight"] = official[gen].pop("FC.2.weight")

    path, official = _official_file(tmp_path, LIGHT, rename)
    config, states = load_official(path, img_size=32)
    assert torch.equal(states["genA2B"]["FC.2.weight"], official["genA2B"]["FC.1.weight"])


def test_full_mode_image_size_is_inferred(tmp_path):
    path, _ = _official_file(tmp_path, FULL)
    config, _ = load_official(path)
    assert (config.img_size, config.light, config.ch, config.n_res) == (16, False, 2, 1)
    with pytest.raises(CheckpointError, match="trained at 16 px"):
        load_official(path, img_size=32)


class NeedsCode:
    pass


def _drop_key(official):
    del official["disLB"]["conv.weight_u"]


def _extra_key(official):
    official["genA2B"]["surprise.weight"] = torch.zeros(1)


def _bad_shape(official):
    official["disGA"]["conv1x1.bias"] = torch.zeros(3)


def _missing_network(official):
    del official["genB2A"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_key, "disLB is missing conv.weight_u"),
        (_extra_key, "genA2B has unexpected key surprise.weight"),
        (_bad_shape, r"disGA.conv1x1.bias has shape \(3,\)"),
        (_missing_network, "missing networks genB2A"),
    ],
)
def test_malformed_official_files_are_refused(tmp_path, mutate, message):
    path, _ = _official_file(tmp_path, LIGHT, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_official(path, img_size=32)


def test_random_bytes_and_code_pickles_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_official(junk)
    evil = tmp_path / "evil.pt"
    torch.save({"genA2B": NeedsCode()}, evil)
    with pytest.raises(CheckpointError, match="need code to be run"):
        load_official(evil)
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError):
        load_official(plain_pickle)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="expected a dict of the six networks"):
        load_official(tensor_only)


def test_cli_refusal_is_one_line_without_traceback(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "ugatit", "import-official", str(junk), "--out", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(junk) in lines[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_refuses_to_overwrite(tmp_path):
    path, _ = _official_file(tmp_path, LIGHT)
    out = tmp_path / "ours.safetensors"
    out.write_bytes(b"precious")
    assert main(["import-official", str(path), "--out", str(out), "--img-size", "32"]) == 2
    assert out.read_bytes() == b"precious"
    assert main(["import-official", str(path), "--out", str(out), "--img-size", "32", "--overwrite"]) == 0


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "ugatit", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ugatit ")
