"""The TF architecture (`tf_models.py`) and `ugatit import-tf`: parity with the official TF graph on the shared
fixture, round trips through bundles our own writer makes, every refusal, and the whole CLI on an imported model."""

import json
from functools import partial

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import SHARED
from tf_bundle import to_tf_variables, write_bundle
from ugatit import fast, tf_import
from ugatit.checkpoint import load_model, read_model_config
from ugatit.cli import main
from ugatit.config import ConfigError, ModelConfig, RunConfig, min_image_size
from ugatit.models import NETWORKS, build_networks
from ugatit.synthetic import write_dataset
from ugatit.tf_checkpoint import TFCheckpoint, TFCheckpointError
from ugatit.tf_import import import_tf, is_optimizer_variable
from ugatit.trainer import Trainer

OFFICIAL_TF = SHARED / "reference" / "fixtures" / "official_tf_small"
FOLDER = "UGATIT_fixture_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing"
PROBE_INPUT = {"genA2B": "x_A", "genB2A": "x_B", "disGA": "x_A", "disLA": "x_A", "disGB": "x_B", "disLB": "x_B"}


@pytest.fixture(scope="module")
def fixture_dir():
    if not (OFFICIAL_TF / FOLDER / "checkpoint").is_file():
        pytest.skip(f"TF fixture not found at {OFFICIAL_TF} (set UGATIT_SHARED to the shared/ folder)")
    return OFFICIAL_TF / FOLDER


@pytest.fixture(scope="module")
def imported(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "model.safetensors"
    report = import_tf(fixture_dir, out, progress=False)
    return out, report


def _nets(path):
    config, states = load_model(path)
    nets = build_networks(config)
    for name, state in states.items():
        nets[name].load_state_dict(state)
    return config, {name: nets[name].eval() for name in states}


def _keep(taps: dict, tap: str, module, inputs, output) -> None:
    taps[tap] = output


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- parity with the official TF graph
@torch.no_grad()
def test_parity_with_the_official_tf_graph(imported):
    """Every main output of the six networks within 1e-4 of the TF record, each debug tap within 2e-4."""
    probe = np.load(OFFICIAL_TF / "probe.npz")
    config, nets = _nets(imported[0])
    assert config.arch == "official-tf" and config.rho_smoothing
    assert (config.img_size, config.ch, config.n_res, config.light) == (96, 4, 4, False)
    assert (config.global_layers, config.local_layers) == (7, 5)  # n_dis 6
    for name, net in nets.items():
        taps = {}
        if name.startswith("gen"):
            hooks = {"encoder": "resblock_3", "cam_features": "conv_1x1", "gamma": "MLP", "beta": "MLP",
                     "decoder_bottleneck": "adaptive_resblock3", "pre_tanh": "G_logit"}  # fmt: skip
            for tap, module in hooks.items():
                net.get_submodule(module).register_forward_hook(partial(_keep, taps, tap))
        out, cam_logit, heatmap = net(_nchw(probe[PROBE_INPUT[name]]))
        assert np.abs(_nhwc(out) - probe[f"{name}.out"]).max() <= 1e-4, name
        assert np.abs(cam_logit.numpy() - probe[f"{name}.cam_logit"]).max() <= 1e-4, name
        assert np.abs(heatmap[0, 0].numpy() - probe[f"{name}.heatmap"]).max() <= 1e-4, name
        if name.startswith("gen"):
            taps["cam_features"] = torch.relu(taps["cam_features"])
            taps["gamma"], taps["beta"] = (t[:, :, None, None] for t in taps["gamma"])
            for tap, value in taps.items():
                assert np.abs(_nhwc(value) - probe[f"{name}.debug.{tap}"]).max() <= 2e-4, (name, tap)


@torch.no_grad()
def test_spectral_norm_iterates_at_every_call_and_stores_u(imported):
    """As the TF graph: one power iteration from the stored u per call, eval mode too, which moves the outputs."""
    probe = np.load(OFFICIAL_TF / "probe.npz")
    _, nets = _nets(imported[0])
    net = nets["disGA"]
    u = net.conv_0.u.clone()
    first = net(_nchw(probe["x_A"]))[0]
    assert not torch.equal(u, net.conv_0.u)
    second = net(_nchw(probe["x_A"]))[0]
    assert np.abs(_nhwc(first) - probe["disGA.out"]).max() <= 1e-4
    assert not torch.equal(first, second)


def test_import_reads_no_optimizer_variable_and_no_meta(fixture_dir, tmp_path):
    """A copy of the fixture whose optimizer slots carry wrong checksums and no .meta imports to the same file,
    with every read tensor's checksum verified: so none of them was read."""
    ckpt = TFCheckpoint(fixture_dir)
    tensors = {name: ckpt.read(name).numpy() for name in ckpt.names}
    optimizer = [name for name in ckpt.names if is_optimizer_variable(name)]
    assert len(optimizer) == 500
    prefix = write_bundle(tmp_path / FOLDER / "UGATIT.model-3", tensors, override={n: {6: 1} for n in optimizer})
    with pytest.raises(TFCheckpointError, match="crc32c"):
        TFCheckpoint(prefix).read(optimizer[0], verify=True)
    report = import_tf(prefix.parent, tmp_path / "copy.safetensors", verify=True, progress=False)
    assert report.skipped == 500 and report.ignored == [] and report.tensors == 276
    original = import_tf(fixture_dir, tmp_path / "original.safetensors", verify=True, progress=False)
    assert original.config == report.config
    assert _same_tensors(tmp_path / "copy.safetensors", tmp_path / "original.safetensors")


def _same_tensors(a, b) -> bool:
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return set(fa.keys()) == set(fb.keys()) and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()
        )


# ---------------------------------------------------------------- bundles our writer makes
def _tf_bundle(tmp_path, config: ModelConfig, folder: str, prefix: str, edit=None):
    torch.manual_seed(0)
    nets = build_networks(config)
    with torch.no_grad():  # values that show a wrong mapping: no bias 0, no gamma 1, no rho at its start
        for net in nets.values():
            for vector in (p for p in net.parameters() if p.ndim == 1):
                vector.add_(0.1 * torch.randn_like(vector))
    variables = to_tf_variables(nets, config)
    variables.update({f"{name}/Adam": value for name, value in list(variables.items())[:3]})
    variables["beta1_power"] = np.array(0.5, np.float32)
    if edit:
        edit(variables)
    return write_bundle(tmp_path / folder / prefix, variables), nets


LIGHT = ModelConfig(img_size=32, ch=4, n_res=2, light=True, global_layers=4, local_layers=3, arch="official-tf",
                    rho_smoothing=False)  # fmt: skip


def test_light_round_trip_with_its_own_prefix(tmp_path):
    """A light TF run writes UGATIT_light.model-N in a folder without `_smoothing`: imported weight for weight."""
    folder = "UGATIT_light_faces_lsgan_2resblock_5dis_1_1_10_10_1000_sn"
    prefix, nets = _tf_bundle(tmp_path, LIGHT, folder, "UGATIT_light.model-7")
    report = import_tf(tmp_path / folder, tmp_path / "m.safetensors", img_size=32, progress=False)
    assert report.config == LIGHT and report.skipped == 4 and "folder name" in report.smoothing
    _, states = load_model(tmp_path / "m.safetensors")
    for name, net in nets.items():
        for key, value in net.state_dict().items():
            assert torch.equal(states[name][key], value), (name, key)


def test_full_mode_flatten_order_round_trips(tmp_path, monkeypatch):
    """Full mode: img_size comes from the MLP's rows, which are reordered from H, W, C; copied in slabs of a few
    rows (as a paper-size import copies its 1 GiB layer), the result is the same."""
    monkeypatch.setattr(tf_import, "SLAB_BYTES", 1000)
    config = ModelConfig(img_size=32, ch=4, n_res=1, global_layers=4, local_layers=3, arch="official-tf")
    _, nets = _tf_bundle(tmp_path, config, "x_smoothing", "UGATIT.model-1")
    report = import_tf(tmp_path / "x_smoothing", tmp_path / "m.safetensors", progress=False)
    assert report.config == config
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    _, ours = _nets(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(ours["genA2B"](x)[0], nets["genA2B"].eval()(x)[0])


def test_rho_smoothing_from_the_folder_name_or_as_asked(tmp_path):
    _tf_bundle(tmp_path, LIGHT, "renamed", "UGATIT_light.model-7")
    said = import_tf(tmp_path / "renamed", tmp_path / "a.safetensors", progress=False)
    assert said.config.rho_smoothing and "does not say" in said.smoothing  # the TF default, said aloud
    asked = import_tf(tmp_path / "renamed", tmp_path / "b.safetensors", rho_smoothing=False, progress=False)
    assert not asked.config.rho_smoothing
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        on, off = (_nets(tmp_path / f"{n}.safetensors")[1]["genA2B"](x)[0] for n in "ab")
    assert (on - off).abs().max() > 1e-3


def test_extra_variables_are_ignored_and_named(tmp_path):
    def add(variables):
        variables["generator_B/CAM_logit/dense/kernel"] = np.zeros((16, 1), np.float32)

    _tf_bundle(tmp_path, LIGHT, "x", "UGATIT.model-1", add)
    report = import_tf(tmp_path / "x", tmp_path / "m.safetensors", progress=False)
    assert report.ignored == ["generator_B/CAM_logit/dense/kernel"]


def _bad_import(tmp_path, capsys, *args) -> str:
    out = tmp_path / "out.safetensors"
    assert main(["import-tf", *map(str, args), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()
    assert not list(tmp_path.glob(".out.safetensors*"))  # no temporary left behind either
    return err


def test_missing_variable_is_one_line_naming_it(tmp_path, capsys):
    name = "discriminator_B/local/conv_last/u"
    _tf_bundle(tmp_path, LIGHT, "x", "UGATIT.model-1", lambda v: v.pop(name))
    assert name in _bad_import(tmp_path, capsys, tmp_path / "x")
    assert main(["import-tf", str(tmp_path / "x"), "--out", str(tmp_path / "g.safetensors"), "--generators-only",
                 "--no-progress"]) == 0  # fmt: skip
    assert set(load_model(tmp_path / "g.safetensors")[1]) == {"genA2B", "genB2A"}


def test_shape_mismatch_and_other_refusals(tmp_path, capsys):
    def widen(variables):
        variables["generator_A/up_conv_0/conv2d/kernel"] = np.zeros((3, 3, 16, 9), np.float32)

    _tf_bundle(tmp_path, LIGHT, "x", "UGATIT.model-1", widen)
    assert "generator_A/up_conv_0/conv2d/kernel" in _bad_import(tmp_path, capsys, tmp_path / "x")
    write_bundle(tmp_path / "other" / "m-1", {"w": np.zeros(3, np.float32)})
    assert "not a checkpoint of the U-GAT-IT TF code" in _bad_import(tmp_path, capsys, tmp_path / "other")
    (tmp_path / "junk.index").write_bytes(b"not an index at all" * 4)
    assert "not a TensorFlow checkpoint" in _bad_import(tmp_path, capsys, tmp_path / "junk")
    assert "not found" in _bad_import(tmp_path, capsys, tmp_path / "nowhere")
    _tf_bundle(tmp_path, LIGHT, "y", "UGATIT.model-1")
    data = tmp_path / "y" / "UGATIT.model-1.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF  # one flipped byte inside a tensor
    data.write_bytes(bytes(raw))
    assert "crc32c mismatch" in _bad_import(tmp_path, capsys, tmp_path / "y")
    data.write_bytes(bytes(raw[:-100]))
    assert "truncated" in _bad_import(tmp_path, capsys, tmp_path / "y")
    _tf_bundle(tmp_path, LIGHT, "z", "UGATIT.model-1")
    variables = {n: TFCheckpoint(tmp_path / "z").read(n).numpy() for n in TFCheckpoint(tmp_path / "z").names}
    write_bundle(tmp_path / "z" / "UGATIT.model-1", variables, override={"generator_B/G_logit/conv2d/bias": {1: 23}})
    assert "unsupported dtype" in _bad_import(tmp_path, capsys, tmp_path / "z")


def test_existing_output_is_not_overwritten(fixture_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_text("keep me")
    assert main(["import-tf", str(fixture_dir), "--out", str(out), "--no-progress"]) == 2
    assert out.read_text() == "keep me" and "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- the architecture as a configuration
def test_arch_settings():
    assert ModelConfig().arch == "official" and ModelConfig().rho_smoothing is False
    assert ModelConfig(arch="official-tf").rho_smoothing is True  # the TF default
    with pytest.raises(ConfigError, match="arch"):
        ModelConfig(arch="tf")
    with pytest.raises(ConfigError, match="rho_smoothing"):
        ModelConfig(rho_smoothing=True)
    # TF's stride-1 4x4 convs keep the size, but their reflection pad of 2 needs 3 pixels: 96 px for n_dis 6.
    assert min_image_size(7, "official-tf") == 96 and min_image_size(5, "official-tf") == 24
    with pytest.raises(ConfigError, match="img_size >= 96"):
        ModelConfig(img_size=64, arch="official-tf")


def test_tf_discriminator_outputs_keep_their_size():
    nets = build_networks(ModelConfig(img_size=96, ch=2, arch="official-tf"))
    x = torch.rand(1, 3, 96, 96)
    assert nets["disGA"](x)[0].shape == (1, 1, 3, 3) and nets["disLA"](x)[0].shape == (1, 1, 12, 12)


def test_fast_path_on_the_tf_architecture():
    """The fast path on TF networks: bf16 compute, lean pads, and ILN / AdaLIN in their scale-and-shift form with
    fp32 statistics; outputs as exact in fp32 to 1e-5 and to bf16 accuracy in bf16, and a fast training step leaves
    the discriminators' u vectors as the exact step does."""
    model = ModelConfig(img_size=32, ch=4, n_res=2, light=True, global_layers=4, local_layers=3, arch="official-tf")
    torch.manual_seed(0)
    nets = build_networks(model)
    for module in nets["genA2B"].modules():  # rho away from its start, smoothing included, so that both terms count
        if hasattr(module, "rho"):
            module.rho.data.uniform_(0, 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reference = nets["genA2B"](x)
        fast.apply(nets["genA2B"])
        assert fast.is_fast(nets["genA2B"])
        in_fp32 = nets["genA2B"](x)
        with fast.autocast(torch.device("cpu"), torch.bfloat16):
            outputs = nets["genA2B"](x.contiguous(memory_format=torch.channels_last))
    for ref, out32, out in zip(reference, in_fp32, outputs, strict=True):
        torch.testing.assert_close(out32, ref, rtol=1e-5, atol=1e-5)
        assert ((ref - out.float()).norm() / ref.norm()).item() <= 0.03
    us = {}
    for precision in ("exact", "fast"):
        torch.manual_seed(1)
        trainer = Trainer(model, RunConfig(precision=precision, fast_dtype="float32"))
        trainer.train_step(x[:1], x[1:])
        us[precision] = trainer.nets["disGA"].conv_0.u.clone()
    torch.testing.assert_close(us["fast"], us["exact"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="grad_checkpoint"):
        Trainer(model, RunConfig(grad_checkpoint=True))


# ---------------------------------------------------------------- the whole CLI on an imported model
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "d", size=96, n_train=2, n_test=2, seed=3)


def test_cli_import_translate_export_and_fine_tune(fixture_dir, dataset, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = tmp_path / "selfie2anime.safetensors"
    assert main(["import-tf", str(fixture_dir), "--out", str(model), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "official-tf" in said and "skipped 500 optimizer variables" in said
    assert read_model_config(model).arch == "official-tf"

    images = dataset / "testA"
    for direction in ("A2B", "B2A"):
        out = tmp_path / direction
        assert main(["translate", str(model), str(images), "--out", str(out), "--direction", direction,
                     "--heatmap", "--no-progress"]) == 0  # fmt: skip
        assert len(list(out.glob("*_heatmap.png"))) == 2 and len(list(out.glob("*.png"))) == 4

    onnx_file = tmp_path / "a2b.onnx"
    assert main(["export", str(model), "--format", "onnx", "--direction", "A2B", "--out", str(onnx_file)]) == 0
    import onnxruntime as ort

    _, nets = _nets(model)
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        reference = nets["genA2B"](x)[0].numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    assert np.abs(result - reference).max() <= 1e-4

    assert main(["export-official", str(model), "--out", str(tmp_path / "official.pt")]) == 2
    assert "no official PyTorch layout" in capsys.readouterr().err

    run_dir = tmp_path / "fine-tune"
    args = ["train", str(dataset), "--run-dir", str(run_dir), "--init-from", str(model), "--iterations", "2",
            "--crop-margin", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "initialised genA2B, genB2A, disGA, disGB, disLA, disLB" in capsys.readouterr().out
    config, tuned = load_model(run_dir)
    _, start = load_model(model)
    assert config == read_model_config(model)
    moved = [k for k in start["genA2B"] if not torch.equal(start["genA2B"][k], tuned["genA2B"][k])]
    assert moved  # fine-tuned, from the imported weights: close to them after two steps at lr 1e-4
    assert all((start["genA2B"][k] - tuned["genA2B"][k]).abs().max() < 0.01 for k in moved)
    rho = [v for k, v in tuned["genA2B"].items() if k.endswith("rho")]
    assert all(((r >= 0) & (r <= 1)).all() for r in rho)  # the TF rho constraint kept
    assert main([*args[:3], str(tmp_path / "other"), "--init-from", str(model), "--img-size", "128"]) == 2
    assert "--img-size" in capsys.readouterr().err


def test_cli_trains_the_tf_architecture_from_scratch(dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", str(dataset), "--run-dir", str(run_dir), "--arch", "official-tf", "--img-size", "96", "--ch",
            "2", "--n-res", "1", "--light", "--iterations", "2", "--crop-margin", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    config, states = load_model(run_dir)
    assert config.arch == "official-tf" and config.rho_smoothing and set(states) == set(NETWORKS)
    assert "genA2B.resblock_0.res1.instance_norm.gamma" in {f"genA2B.{k}" for k in states["genA2B"]}
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["g_loss"])


def test_demo_page_of_an_imported_model(imported):
    from ugatit.demo import DemoModel

    model = DemoModel(imported[0])
    assert model.directions == ["A2B", "B2A"] and "official-tf" in model.describe()
    photo = SHARED / "reference" / "fixtures" / "mtcnn" / "images" / "a_astronaut.png"
    if photo.is_file():
        assert model.translate(str(photo), "B2A", faces=True).translation.size == (96, 96)


def test_hub_folder_of_an_imported_model(imported, tmp_path):
    from ugatit.hub import from_pretrained, save_pretrained

    save_pretrained(imported[0], tmp_path / "hub", None)
    translator = from_pretrained(tmp_path / "hub", direction="B2A")
    assert translator.config.arch == "official-tf"
