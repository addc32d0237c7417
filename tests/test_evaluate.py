"""The FID Inception network, its weight file handling, and evaluation end to end.

No test downloads anything: the weights are random values in the real file's key layout, written by the test and
read back through the normal loading path. End-to-end tests run the network at 75x75 (the smallest input it
accepts) instead of 299x299 to stay fast; the 299 path is checked on its own.
"""

import hashlib
import io
import json
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ugatit import inception
from ugatit.checkpoint import CheckpointError, load_model, save_checkpoint, save_model
from ugatit.config import ModelConfig, RunConfig
from ugatit.data import DataError
from ugatit.evaluate import (
    KIDSettings,
    KIDTracker,
    evaluate_checkpoint,
    evaluate_folders,
    extract_features,
    format_table,
    write_results,
)
from ugatit.inception import (
    FIDInceptionV3,
    InceptionFeatures,
    InceptionWeightsError,
    WeightsNotFoundError,
    find_weights,
    load_inception,
    sha256_of,
)
from ugatit.models import build_networks
from ugatit.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:Inception weights .* are not pt_inception")

TINY = {"img_size": 32, "ch": 4, "n_res": 1, "light": True, "global_layers": 4, "local_layers": 3}
FAST_SIZE = 75


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """Random weights whose activations keep their scale through all 94 layers: He-initialised convolutions and
    zero-mean, bias-free batch norms make the network positively homogeneous, so features stay O(1) whatever the
    images look like (PyTorch's default init would shrink them by ~3x per layer)."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.8, 1.2)
            nn.init.uniform_(module.running_var, 0.8, 1.2)
    return network.state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, inception_state) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(inception_state, path)
    return path


@pytest.fixture(scope="module")
def model(weights_file) -> InceptionFeatures:
    features = InceptionFeatures(weights_file)
    features.input_size = FAST_SIZE
    return features


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> Path:
    """An empty cache, no weights variable, and downloads forbidden: nothing can reach the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(inception.NO_DOWNLOAD_ENV, "1")
    return tmp_path / "cache" / "ugatit" / inception.WEIGHTS_NAME


def noise_image(size: int, seed: int, bright: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size))
    arr = np.asarray(coarse, dtype=np.int64) + rng.integers(-40, 41, (size, size, 3))
    if bright:  # a visibly different domain: bright, with stripes
        arr = arr // 4 + 160 + 60 * (np.arange(size)[None, :, None] % 4 < 2)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, seed: int, size: int = 32, bright: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise_image(size, seed * 1000 + i, bright).save(folder / f"{i:03d}.png")
    return folder


# ----------------------------------------------------------------------------------------------
# Network


def test_state_dict_has_the_weight_files_layout():
    network = FIDInceptionV3()
    state = network.state_dict()
    assert len(state) == inception.STATE_DICT_KEYS == 566
    assert sum(p.numel() for p in network.parameters()) == 23_850_960
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert not [key for key in state if "Aux" in key]
    bn = network.Mixed_6c.branch1x1.bn
    assert bn.eps == 0.001


def test_pooling_follows_the_tf_graph():
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(inception._tf_avg_pool(ones), ones)  # padding is not averaged in, as in TF
    network = FIDInceptionV3()
    assert not network.Mixed_7b.max_pool and network.Mixed_7c.max_pool


def test_features_are_2048_d_for_small_inputs(weights_file):
    out = InceptionFeatures(weights_file)(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 2048) and torch.isfinite(out).all() and out.std() > 0


class Spy(nn.Module):
    """Stands in for the network to see exactly what it is given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize("size", [64, 299])
def test_inputs_are_resized_to_299_and_mapped_to_minus_one_one(weights_file, size):
    features = InceptionFeatures(weights_file)
    features.network = Spy()
    images = torch.rand(2, 3, size, size)
    features(images)
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features.network.seen, 2 * resized - 1)
    if size == 299:  # at 299 the resize is the identity
        torch.testing.assert_close(features.network.seen, 2 * images - 1)


def test_records_which_weights_it_uses(weights_file):
    with pytest.warns(UserWarning, match="will not be comparable"):
        features = InceptionFeatures(weights_file)
    assert features.sha256 == sha256_of(weights_file) and not features.standard


# ----------------------------------------------------------------------------------------------
# Weight files


def test_loading_names_a_missing_key(tmp_path, inception_state):
    state = dict(inception_state)
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(InceptionWeightsError, match=r"1 missing: Mixed_6b\.branch7x7_2\.conv\.weight"):
        load_inception(tmp_path / "w.pth")


def test_loading_names_a_wrong_shape_and_unexpected_keys(tmp_path, inception_state):
    state = dict(inception_state)
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(InceptionWeightsError) as info:
        load_inception(tmp_path / "w.pth")
    message = str(info.value)
    assert "fc.weight (1000, 2048) (expected (1008, 2048))" in message
    assert "unexpected: AuxLogits.fc.weight" in message and inception.WEIGHTS_URL in message


def test_loading_refuses_files_that_are_not_state_dicts(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(InceptionWeightsError, match="cannot read"):
        load_inception(tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(InceptionWeightsError, match="not a state_dict"):
        load_inception(tmp_path / "list.pth")


def test_loading_accepts_a_file_without_batch_norm_counters(tmp_path, inception_state):
    state = inception_state
    without = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    assert len(without) == 472
    torch.save(without, tmp_path / "w.pth")
    loaded = load_inception(tmp_path / "w.pth")
    torch.testing.assert_close(loaded.Mixed_7c.branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"])


def test_missing_weights_say_where_to_put_the_file(no_weights):
    with pytest.raises(WeightsNotFoundError) as info:
        find_weights()
    message = str(info.value)
    assert str(no_weights) in message and inception.WEIGHTS_URL in message and inception.WEIGHTS_ENV in message
    with pytest.raises(WeightsNotFoundError):
        InceptionFeatures()
    assert isinstance(info.value, ValueError)


def test_download_can_be_disabled_by_parameter(no_weights, monkeypatch):
    monkeypatch.delenv(inception.NO_DOWNLOAD_ENV)

    def refuse(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(inception.urllib.request, "urlopen", refuse)
    with pytest.raises(WeightsNotFoundError, match="downloading is disabled"):
        find_weights(download=False)


def test_a_named_file_must_exist_and_is_never_replaced(tmp_path, no_weights, monkeypatch, weights_file):
    with pytest.raises(WeightsNotFoundError, match="nope.pth: no such file"):
        find_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsNotFoundError, match=r"gone.pth \(from \$UGATIT_INCEPTION_WEIGHTS\)"):
        find_weights()
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(weights_file))
    assert find_weights() == weights_file
    assert find_weights(weights_file) == weights_file


def test_the_cache_directory_is_used(no_weights, weights_file):
    no_weights.parent.mkdir(parents=True)
    no_weights.write_bytes(weights_file.read_bytes())
    assert find_weights() == no_weights


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_is_verified_before_it_is_kept(no_weights, monkeypatch):
    monkeypatch.delenv(inception.NO_DOWNLOAD_ENV)
    payload = b"pretend weights"
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    with pytest.raises(WeightsNotFoundError, match="was discarded"):
        find_weights()
    assert list(no_weights.parent.iterdir()) == []  # no partial or unverified file left behind

    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    assert find_weights() == no_weights and no_weights.read_bytes() == payload


def test_a_failed_download_says_where_to_put_the_file(no_weights, monkeypatch):
    monkeypatch.delenv(inception.NO_DOWNLOAD_ENV)

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    with pytest.raises(WeightsNotFoundError, match="download failed .*no network.*" + str(no_weights)):
        find_weights()


# ----------------------------------------------------------------------------------------------
# Features


def test_extract_features_is_independent_of_batching_order_and_input_kind(model, tmp_path):
    folder = write_images(tmp_path / "imgs", 5, seed=1)
    noise_image(48, 99).save(tmp_path / "big.png")
    paths = sorted(folder.iterdir()) + [tmp_path / "big.png"]
    by_path = extract_features(paths, model, batch_size=4, progress=False)
    assert by_path.shape == (6, 2048) and by_path.dtype == np.float64
    images = [Image.open(p).convert("RGB") for p in paths]
    one_by_one = extract_features(images, model, batch_size=1, progress=False)
    reversed_order = extract_features(paths[::-1], model, batch_size=6, progress=False)[::-1]
    # Batched and single-image convolutions differ in the last float bits, which 94 random layers amplify.
    scale = np.abs(by_path).max()
    assert np.abs(one_by_one - by_path).max() < 1e-4 * scale
    assert np.abs(reversed_order - by_path).max() < 1e-4 * scale


# ----------------------------------------------------------------------------------------------
# Folders


PROTOCOL_FIELDS = {"ugatit_version", "features", "inception_weights", "resize", "kernel", "kid", "kid_blocks",
                   "mean_kid", "fid", "units"}  # fmt: skip


def test_evaluate_folders_end_to_end(model, tmp_path):
    fake = write_images(tmp_path / "fake", 12, seed=1, bright=True)
    real = write_images(tmp_path / "real", 12, seed=2)
    source = write_images(tmp_path / "source", 12, seed=3)
    results = evaluate_folders(fake, real, model, source_dir=source, progress=False)
    write_results(results, tmp_path / "out" / "kid.json")
    saved = json.loads((tmp_path / "out" / "kid.json").read_text())

    assert set(saved["protocol"]) == PROTOCOL_FIELDS
    assert saved["protocol"]["inception_weights"]["sha256"] == model.sha256
    assert saved["protocol"]["kid"]["subset_size"] == 12 and saved["protocol"]["kid"]["n_subsets"] == 100
    assert saved["protocol"]["kid_blocks"]["max_block_size"] == 10
    assert "75x75 bilinear" in saved["protocol"]["resize"]
    assert (saved["n_fake"], saved["n_real"], saved["n_source"]) == (12, 12, 12)
    assert saved["fake_dir"] == str(fake) and saved["source_dir"] == str(source)
    assert saved["kid_blocks"]["n_blocks"] == 2
    assert saved["kid"]["mean"] > 0 and saved["fid"] > 0 and saved["mean_kid"]["mean"] > 0

    table = format_table(results)
    assert "KID x100" in table and f"{100 * results['kid']['mean']:.2f} ± {100 * results['kid']['std']:.2f}" in table


def test_identical_folders_score_zero(model, tmp_path):
    real = write_images(tmp_path / "real", 8, seed=2)
    copy = write_images(tmp_path / "copy", 8, seed=2)
    different = write_images(tmp_path / "other", 8, seed=5, bright=True)
    same = evaluate_folders(copy, real, model, progress=False)
    other = evaluate_folders(different, real, model, progress=False)
    assert same["fid"] < 1e-6 * other["fid"]
    # Unbiased MMD^2 of a set with itself is slightly negative (O(1/n)), not exactly 0.
    assert abs(same["kid"]["mean"]) < 0.1 * other["kid"]["mean"]
    assert abs(same["kid_blocks"]["mean"]) < 0.1 * other["kid_blocks"]["mean"]
    assert same["mean_kid"] is None and same["protocol"]["kid"]["subset_size"] == 8


def test_evaluate_folders_refuses_an_empty_folder(model, tmp_path):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "real", 3, seed=2)
    with pytest.raises(DataError, match="holds no images"):
        evaluate_folders(tmp_path / "empty", tmp_path / "real", model, progress=False)


def test_single_block_standard_error_is_written_as_null(model, tmp_path):
    fake = write_images(tmp_path / "fake", 4, seed=1)
    real = write_images(tmp_path / "real", 4, seed=2)
    results = evaluate_folders(fake, real, model, progress=False)
    write_results(results, tmp_path / "kid.json")
    assert json.loads((tmp_path / "kid.json").read_text())["kid_blocks"]["stderr"] is None
    row = format_table(results).splitlines()[1]
    assert row.count("±") == 1  # the subset KID's std; the block KID has no standard error, mean KID is absent


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny checkpoint, the networks it was saved from, and a dataset with test and train folders."""
    root = tmp_path_factory.mktemp("run")
    config = ModelConfig(**TINY)
    torch.manual_seed(0)
    nets = build_networks(config)
    save_model(root / "model.safetensors", {name: net.state_dict() for name, net in nets.items()}, config)
    data = root / "data"
    write_images(data / "testA", 5, seed=11)
    write_images(data / "testB", 6, seed=12, bright=True)
    write_images(data / "trainB", 7, seed=13, bright=True)
    write_images(data / "trainA", 2, seed=14)
    return root / "model.safetensors", data, nets, config


def test_evaluate_checkpoint_both_directions(model, tiny_run, tmp_path):
    checkpoint, data, _, _ = tiny_run
    settings = KIDSettings(n_subsets=5, max_block_size=4)
    results = evaluate_checkpoint(checkpoint, data, "both", weights=model, out_dir=tmp_path / "out",
                                  settings=settings, batch_size=4, progress=False)  # fmt: skip
    a2b, b2a = results["directions"]["A2B"], results["directions"]["B2A"]
    assert (a2b["n_fake"], a2b["n_real"], a2b["n_source"]) == (5, 6, 5)
    assert (b2a["n_fake"], b2a["n_real"], b2a["n_source"]) == (6, 5, 6)
    assert a2b["real_dir"] == str(data / "testB") and a2b["source_dir"] == str(data / "testA")
    assert len(list((tmp_path / "out" / "A2B").glob("*.png"))) == 5
    assert len(list((tmp_path / "out" / "B2A").glob("*.png"))) == 6
    assert results["translation"]["img_size"] == 32 and results["config"]["ch"] == 4
    assert a2b["protocol"]["kid"]["n_subsets"] == 5 and a2b["mean_kid"] is not None
    write_results(results, tmp_path / "kid.json")
    assert set(json.loads((tmp_path / "kid.json").read_text())["directions"]) == {"A2B", "B2A"}
    assert format_table(results).splitlines()[1].startswith("A2B")


def test_evaluate_a_model_of_the_tf_architecture(model, tiny_run, tmp_path):
    """A TF-architecture model (what `import-tf` writes) evaluates like any other: translated at its own size."""
    _, data, _, _ = tiny_run
    config = ModelConfig(img_size=32, ch=4, n_res=1, light=True, global_layers=4, local_layers=3, arch="official-tf")
    torch.manual_seed(0)
    nets = build_networks(config)
    save_model(tmp_path / "tf.safetensors", {name: net.state_dict() for name, net in nets.items()}, config)
    results = evaluate_checkpoint(tmp_path / "tf.safetensors", data, "A2B", weights=model,
                                  settings=KIDSettings(n_subsets=5, max_block_size=4), progress=False)  # fmt: skip
    assert results["directions"]["A2B"]["n_fake"] == 5 and results["config"]["arch"] == "official-tf"
    assert np.isfinite(results["directions"]["A2B"]["kid"]["mean"])


def test_evaluate_checkpoint_against_train_images_in_a_temporary_folder(model, tiny_run, tmp_path):
    checkpoint, data, _, _ = tiny_run
    results = evaluate_checkpoint(checkpoint, data, "A2B", real_split="train", weights=model, progress=False)
    a2b = results["directions"]["A2B"]
    assert set(results["directions"]) == {"A2B"} and results["real_split"] == "train"
    assert a2b["n_real"] == 7 and a2b["real_dir"] == str(data / "trainB") and a2b["fake_dir"] is None


def test_evaluate_checkpoint_never_writes_into_a_used_folder(model, tiny_run, tmp_path):
    checkpoint, data, _, _ = tiny_run
    (tmp_path / "out" / "B2A").mkdir(parents=True)
    (tmp_path / "out" / "B2A" / "mine.png").write_bytes(b"user file")
    with pytest.raises(FileExistsError, match="not empty"):
        evaluate_checkpoint(checkpoint, data, "both", weights=model, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "A2B").exists()  # refused before translating anything
    with pytest.raises(ValueError, match="real_split"):
        evaluate_checkpoint(checkpoint, data, "A2B", real_split="val", weights=model)
    with pytest.raises(ValueError, match="direction"):
        evaluate_checkpoint(checkpoint, data, "A2C", weights=model)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        evaluate_checkpoint(tmp_path / "missing.safetensors", data, weights=model)


def test_evaluate_checkpoint_of_a_run_folder_and_fast(model, tiny_run, tmp_path):
    """A run folder is scored as its latest checkpoint; the fast path scores (almost) as the exact one."""
    checkpoint, data, _, config = tiny_run
    _, states = load_model(checkpoint)
    nets = build_networks(config)
    for name, net in nets.items():
        net.load_state_dict(states[name])
    trainer = Trainer(config, RunConfig(), nets=nets)
    trainer.step = 5
    save_checkpoint(trainer, tmp_path / "run", {})
    settings = KIDSettings(n_subsets=5, max_block_size=4)
    theirs = evaluate_checkpoint(checkpoint, data, "A2B", weights=model, settings=settings, progress=False)
    ours = evaluate_checkpoint(tmp_path / "run", data, "A2B", weights=model, settings=settings, progress=False)
    assert ours["config"] == theirs["config"] and theirs["translation"]["precision"] == "exact"
    for key in ("kid", "kid_blocks", "fid"):
        assert ours["directions"]["A2B"][key] == theirs["directions"]["A2B"][key]
    fast = evaluate_checkpoint(tmp_path / "run", data, "A2B", weights=model, settings=settings, progress=False,
                               precision="fast", fast_dtype="float32")  # fmt: skip
    assert fast["translation"]["precision"] == "fast"
    assert fast["directions"]["A2B"]["fid"] == pytest.approx(theirs["directions"]["A2B"]["fid"], rel=1e-2)
    with pytest.raises(ValueError, match="precision"):
        evaluate_checkpoint(checkpoint, data, "A2B", weights=model, precision="half")


# ----------------------------------------------------------------------------------------------
# Training-time tracking


def test_tracker_matches_the_file_based_evaluation(model, tiny_run):
    checkpoint, data, nets, config = tiny_run
    trainer = types.SimpleNamespace(nets=nets, model=config)
    for net in nets.values():
        net.train()
    track = KIDTracker(data, model, n_images=100, batch_size=4)
    first = track(trainer)
    assert set(first) == {"kid_A2B", "kid_B2A", "kid_blocks_A2B", "kid_blocks_B2A"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in first.values())
    assert nets["genA2B"].training and nets["genB2A"].training  # mode restored
    assert track(trainer) == first  # cached real features, deterministic generators

    # With at most 10 images per domain there is a single block: the plain unbiased MMD^2 of all rows.
    files = evaluate_checkpoint(checkpoint, data, "both", weights=model, progress=False)
    for name in ("A2B", "B2A"):
        expected = 100 * files["directions"][name]["kid_blocks"]["mean"]
        assert first[f"kid_{name}"] == pytest.approx(expected, rel=1e-4)
        assert first[f"kid_blocks_{name}"] == pytest.approx(expected, rel=1e-4)


def test_tracker_uses_the_first_n_test_images(model, tiny_run):
    _, data, nets, config = tiny_run
    track = KIDTracker(data, model, n_images=3)
    assert track.paths == {d: sorted((data / f"test{d}").iterdir())[:3] for d in "AB"}
    scores = track(types.SimpleNamespace(nets=nets, model=config))
    assert all(np.isfinite(value) for value in scores.values())


def test_tracker_needs_test_folders(model, tmp_path):
    write_images(tmp_path / "data" / "testA", 3, seed=1)
    with pytest.raises(DataError, match="testB"):
        KIDTracker(tmp_path / "data", model)


def test_cli_evaluate_folders_and_missing_weights(weights_file, tmp_path, capsys, monkeypatch):
    """`ugatit evaluate --fake --real` end to end (full 299 px Inception with random weights), and the clear error
    when no weights can be found."""
    from ugatit.cli import main

    fake = write_images(tmp_path / "fake", 6, seed=1)
    real = write_images(tmp_path / "real", 6, seed=2, bright=True)
    out = tmp_path / "eval.json"
    args = ["evaluate", "--fake", str(fake), "--real", str(real), "--inception-weights", str(weights_file)]
    assert main([*args, "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "KID" in printed and "FID" in printed
    results = json.loads(out.read_text())
    assert results["n_fake"] == 6 and results["n_real"] == 6
    assert main([*args, "--out", str(out)]) == 2  # never overwritten without --overwrite
    monkeypatch.setenv("UGATIT_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("UGATIT_INCEPTION_WEIGHTS", raising=False)
    assert main(["evaluate", "--fake", str(fake), "--real", str(real), "--out", str(tmp_path / "x.json")]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err


def test_training_with_eval_every_logs_kid_and_keeps_best(weights_file, tmp_path):
    from ugatit.checkpoint import load_model
    from ugatit.config import configs
    from ugatit.synthetic import write_dataset
    from ugatit.train import train

    data = write_dataset(tmp_path / "data", size=32, n_train=4, n_test=3, seed=5)
    config, run = configs(**TINY, num_workers=0, iterations=4, eval_every=2, sample_every=100)
    train(config, run, data, tmp_path / "run", progress=False, inception_weights=weights_file)
    entries = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [e for e in entries if "eval" in e]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(np.isfinite(e["eval"]["kid_A2B"]) and np.isfinite(e["eval"]["kid_B2A"]) for e in evals)
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["kid"] == min(e["eval"]["kid_mean"] for e in evals)
    config_back, states = load_model(tmp_path / "run" / "checkpoints" / "best")
    assert config_back == config and "genA2B" in states
