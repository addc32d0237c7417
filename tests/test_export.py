"""ONNX export: ONNX Runtime against eager PyTorch, the uint8 variant, metadata, size refusals, and OnnxTranslator
standing in for Translator (translate_files, load_translator)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ugatit import __version__, export, fast  # noqa: E402
from ugatit.backends import load_translator  # noqa: E402
from ugatit.checkpoint import CheckpointError, save_checkpoint, save_model, write_json  # noqa: E402
from ugatit.config import ModelConfig, RunConfig, model_config_from_dict, to_dict  # noqa: E402
from ugatit.data import eval_transform  # noqa: E402
from ugatit.export import ExportError, export_onnx  # noqa: E402
from ugatit.inference import Translator, translate_files  # noqa: E402
from ugatit.models import build_generator, build_networks  # noqa: E402
from ugatit.norms import instance_layer_norm, instance_layer_norm_affine  # noqa: E402
from ugatit.onnx_runtime import OnnxTranslator  # noqa: E402
from ugatit.synthetic import make_sample  # noqa: E402
from ugatit.trainer import Trainer  # noqa: E402

LIGHT = ModelConfig(img_size=32, ch=4, n_res=1, light=True, global_layers=4, local_layers=3)
FULL = ModelConfig(img_size=16, ch=2, n_res=1, light=False, global_layers=3, local_layers=3)
TOLERANCE = 1e-4  # fp32 eager vs ONNX Runtime: the README's stated parity, far above their rounding differences


def write_checkpoint(path: Path, config: ModelConfig) -> Path:
    torch.manual_seed(0)
    save_model(path, {name: net.state_dict() for name, net in build_networks(config).items()}, config)
    return path


def write_run(run_dir: Path, config: ModelConfig, steps: tuple[int, ...]) -> Path:
    """A run folder as training leaves it: config.json and a training checkpoint per step, each with its own
    weights."""
    for step in steps:
        torch.manual_seed(step)
        trainer = Trainer(config, RunConfig(), nets=build_networks(config))
        trainer.step = step
        save_checkpoint(trainer, run_dir, {})
    write_json(run_dir / "config.json", {"model": to_dict(config), "run": to_dict(RunConfig())})
    return run_dir


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height))
    fine = rng.integers(-40, 41, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + fine, 0, 255).astype(np.uint8))


def max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max())


@pytest.fixture(scope="module", params=["light", "full"])
def model(request, tmp_path_factory):
    """A checkpoint, its torch Translator, and its float (with heatmap, the default opset) and uint8 (the lowest
    opset written) ONNX exports."""
    folder = tmp_path_factory.mktemp(request.param)
    config = LIGHT if request.param == "light" else FULL
    checkpoint = write_checkpoint(folder / "model.safetensors", config)
    translator = Translator.from_checkpoint(checkpoint, "A2B")
    float_file = export_onnx(translator, folder / "float.onnx", heatmap=True)
    uint8_file = export_onnx(checkpoint, folder / "uint8.onnx", "A2B", uint8=True, opset=export.MIN_OPSET)
    return {
        "config": config,
        "checkpoint": checkpoint,
        "torch": translator,
        "float": OnnxTranslator.from_file(float_file),
        "uint8": OnnxTranslator.from_file(uint8_file),
        "float_file": float_file,
    }


def reference(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image, _, heatmap = model["torch"].generator(x)
    return image, heatmap


@pytest.mark.parametrize("correction", [1, 0])  # the PyTorch code's unbiased variances, the TF code's biased ones
@pytest.mark.parametrize("per_sample", [True, False])  # AdaILN's gamma and beta, ILN's
def test_exported_norm_form_is_as_exact_as_the_official_one(correction, per_sample):
    """The exported graph computes ILN / AdaILN as a scale and shift per (sample, channel): in fp32 it must stay as
    close to the float64 value as the op-for-op formula (an offset mean is where a careless form loses digits)."""
    g = torch.Generator().manual_seed(correction)
    x = torch.randn(2, 16, 12, 10, generator=g) * 3 + 5
    rho = torch.rand(1, 16, 1, 1, generator=g)
    shape = (2, 16, 1, 1) if per_sample else (1, 16, 1, 1)
    gamma, beta = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    args = (x, rho, gamma, beta)
    truth = instance_layer_norm(*(t.double() for t in args), correction=correction)
    official = (instance_layer_norm(*args, correction=correction).double() - truth).abs().max()
    affine = (instance_layer_norm_affine(*args, correction=correction).double() - truth).abs().max()
    assert affine <= 2 * official + 1e-6
    wrong = instance_layer_norm_affine(*args, correction=1 - correction)
    assert (wrong.double() - truth).abs().max() > 100 * official  # the correction is really applied


@pytest.mark.parametrize("batch", [1, 3])
def test_random_inputs_match_eager(model, batch):
    size = model["config"].img_size
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    image, heatmap = model["float"].run(x.numpy())
    ref_image, ref_heatmap = reference(model, x)
    assert image.shape == tuple(ref_image.shape) and heatmap.shape == tuple(ref_heatmap.shape)
    assert max_diff(image, ref_image) <= TOLERANCE
    assert max_diff(heatmap, ref_heatmap) <= TOLERANCE


def test_real_image_matches_eager(model):
    size = model["config"].img_size
    images = [make_sample(domain, np.random.default_rng(i), 64)[0] for i, domain in enumerate("AB")]
    x = torch.stack([eval_transform(img, size) for img in images])
    image, heatmap = model["float"].run(x.numpy())
    ref_image, ref_heatmap = reference(model, x)
    assert max_diff(image, ref_image) <= TOLERANCE
    assert max_diff(heatmap, ref_heatmap) <= TOLERANCE


@pytest.mark.parametrize("model", ["light"], indirect=True)  # only a light generator has dynamic H and W
def test_light_runs_at_other_sizes(model):
    x = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(7)) * 2 - 1
    image, heatmap = model["float"].run(x.numpy())
    ref_image, ref_heatmap = reference(model, x)
    assert image.shape == (3, 3, 48, 40) and heatmap.shape == (3, 1, 12, 10)
    assert max_diff(image, ref_image) <= TOLERANCE
    assert max_diff(heatmap, ref_heatmap) <= TOLERANCE


def test_uint8_matches_float_after_quantisation(model):
    size = model["config"].img_size
    pixels = np.random.default_rng(3).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    as_float = torch.from_numpy(pixels).float().div(255).sub(0.5).div(0.5)
    out, heatmap = model["uint8"].run(pixels)
    ref, _ = reference(model, as_float)
    assert out.dtype == np.uint8 and heatmap is None
    levels = ((ref.clamp(-1, 1) + 1) * 127.5).round().numpy()
    assert np.abs(out.astype(np.int16) - levels).max() <= 1


def test_metadata(model):
    config = model["config"]
    proto = onnx.load(str(model["float_file"]))
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    assert meta["format"] == "ugatit-onnx" and meta["ugatit_version"] == __version__
    assert meta["direction"] == "A2B" and meta["img_size"] == str(config.img_size)
    assert meta["light"] == str(config.light).lower() and meta["dynamic_size"] == str(config.light).lower()
    assert model_config_from_dict(json.loads(meta["config"])) == config
    assert set(json.loads(meta["config"])) == set(to_dict(config))  # the model config alone, no run settings
    assert meta["input_range"].startswith("float32 [-1, 1]") and meta["outputs"] == "image,heatmap"
    assert meta["opset"] == "17" and proto.opset_import[0].version == 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # dynamic batch
    if config.light:
        assert dims[2].dim_param and dims[3].dim_param
    else:
        assert (dims[2].dim_value, dims[3].dim_value) == (config.img_size, config.img_size)
        assert "fixed to the trained size" in meta["input_shape"]
    assert model["uint8"].metadata["input_range"].startswith("uint8 [0, 255]")
    assert model["uint8"].metadata["opset"] == str(export.MIN_OPSET)


def test_refuses_shapes_it_cannot_take(model):
    onnx_translator = model["float"]
    if model["config"].light:
        with pytest.raises(ExportError, match="multiples of 4"):
            onnx_translator.run(np.zeros((1, 3, 30, 32), np.float32))
    else:
        with pytest.raises(ExportError, match="full-mode model only takes 16x16 images.*got 20x20"):
            onnx_translator.run(np.zeros((1, 3, 20, 20), np.float32))
    with pytest.raises(ExportError, match="N x 3 x H x W"):
        onnx_translator.run(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ExportError, match="uint8 input"):
        model["uint8"].run(np.zeros((1, 3, 32, 32), np.float32))


def test_pil_interface_matches_translator(model):
    images = [random_image(40, 30, seed) for seed in range(3)]
    onnx_translator, torch_translator = model["float"], model["torch"]
    single = onnx_translator(images[0])
    assert isinstance(single, Image.Image) and single.size == (model["config"].img_size,) * 2
    for ours, theirs in zip(onnx_translator(images, batch_size=2), torch_translator(images), strict=True):
        assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
    for ours, theirs in zip(model["uint8"](images, True), torch_translator(images, True), strict=True):
        assert ours.size == (40, 30)
        assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
    out, overlay = onnx_translator.translate_with_heatmap(images[0])
    ref_out, ref_overlay = torch_translator.translate_with_heatmap(images[0])
    assert np.abs(np.asarray(overlay, np.int16) - np.asarray(ref_overlay, np.int16)).max() <= 1
    with pytest.raises(ValueError, match="no heatmap output"):
        model["uint8"].translate_with_heatmap(images[0])
    assert onnx_translator.config == model["config"] and onnx_translator.direction == "A2B"
    assert onnx_translator.device == torch.device("cpu") and onnx_translator.batch_size == 1  # the CPU default


def test_translate_files_same_as_torch(model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed, size in enumerate([(40, 30), (32, 32), (20, 50)]):
        random_image(*size, seed).save(inputs / f"img{seed}.png")
    outputs = {}
    for name in ("torch", "float"):
        out_dir = tmp_path / name
        translate_files(model[name], [inputs], out_dir, batch_size=2, heatmap=True, original_size=True, progress=False)
        outputs[name] = sorted(out_dir.iterdir())
    assert [p.name for p in outputs["torch"]] == [p.name for p in outputs["float"]] and len(outputs["torch"]) == 6
    for theirs, ours in zip(outputs["torch"], outputs["float"], strict=True):
        a, b = np.asarray(Image.open(theirs), np.int16), np.asarray(Image.open(ours), np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_load_translator(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "light.safetensors", LIGHT)
    assert isinstance(load_translator(checkpoint), Translator)
    cache = tmp_path / "cache"
    onnx_translator = load_translator(checkpoint, "B2A", backend="onnxruntime", cache_dir=cache)
    assert isinstance(onnx_translator, OnnxTranslator) and onnx_translator.direction == "B2A"
    assert onnx_translator.has_heatmap
    (cached,) = cache.iterdir()
    stamp = cached.stat().st_mtime_ns
    load_translator(checkpoint, "B2A", backend="onnxruntime", cache_dir=cache)
    assert list(cache.iterdir()) == [cached] and cached.stat().st_mtime_ns == stamp  # reused, not re-exported
    image = random_image(32, 32, 5)
    reference_out = Translator.from_checkpoint(checkpoint, "B2A")(image)
    temporary = load_translator(checkpoint, "B2A", backend="onnxruntime")
    for out in (onnx_translator(image), temporary(image)):
        assert np.abs(np.asarray(out, np.int16) - np.asarray(reference_out, np.int16)).max() <= 1
    assert isinstance(load_translator(cached, backend="onnxruntime"), OnnxTranslator)
    upper = cached.with_name("MODEL.ONNX")
    upper.write_bytes(cached.read_bytes())
    assert isinstance(load_translator(upper), OnnxTranslator)  # the backend an .onnx file needs, by default
    with pytest.raises(ValueError, match="which the onnxruntime backend runs"):
        load_translator(cached, backend="torch")
    with pytest.raises(ValueError, match="torch backend's"):
        load_translator(cached, precision="fast")
    with pytest.raises(ValueError, match="translates B2A, not A2B"):
        load_translator(cached, "A2B", backend="onnxruntime")
    with pytest.raises(ExportError, match="backend="):
        load_translator(checkpoint, backend="tensorrt")
    gpu = {"torch": torch.cuda.is_available(), "onnxruntime": "CUDAExecutionProvider" in ort.get_available_providers()}
    assert load_translator(checkpoint, device="auto").device.type == ("cuda" if gpu["torch"] else "cpu")
    on_auto = load_translator(cached, backend="onnxruntime", device="auto")
    assert on_auto.device.type == ("cuda" if gpu["onnxruntime"] else "cpu")


@pytest.mark.parametrize("fast_dtype", ["float32", "auto"])
def test_fast_translator_exports_its_weights_through_the_exact_layers(tmp_path, fast_dtype):
    """The fused kernels have no ONNX form: a fast translator exports the same function with the exact layers, and
    the file gives the exact fp32 output (whatever dtype the translator itself computes in)."""
    checkpoint = write_checkpoint(tmp_path / "light.safetensors", LIGHT)
    translator = Translator.from_checkpoint(checkpoint, precision="fast", fast_dtype=fast_dtype)
    assert translator.precision == "fast" and fast.is_fast(translator.generator)
    exported = OnnxTranslator.from_file(export_onnx(translator, tmp_path / "fast.onnx", heatmap=True))
    assert fast.is_fast(translator.generator)  # left as it was
    exact = Translator.from_checkpoint(checkpoint)
    assert not fast.is_fast(exact.generator)
    for shape in [(2, 3, 32, 32), (1, 3, 48, 40)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[0])) * 2 - 1
        image, heatmap = exported.run(x.numpy())
        with torch.no_grad():
            ref_image, _, ref_heatmap = exact.generator(x)
        assert max_diff(image, ref_image) <= TOLERANCE and max_diff(heatmap, ref_heatmap) <= TOLERANCE
    images = [random_image(32, 32, seed) for seed in range(2)]
    for ours, theirs in zip(exported(images), exact(images), strict=True):
        assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1


def build_generator_like(generator: torch.nn.Module) -> torch.nn.Module:
    """A freshly built (exact) generator holding `generator`'s weights."""
    twin = build_generator(LIGHT)
    twin.load_state_dict(generator.state_dict())
    return twin.eval()


def test_generator_with_fast_kernels_runs_exact_in_an_exact_translator(tmp_path):
    """The translator owns how its generator computes: one handed a generator with the fast kernels swapped in runs
    (and exports) the exact computation."""
    torch.manual_seed(0)
    generator = fast.apply(build_generator(LIGHT))
    assert fast.is_fast(generator)
    translator = Translator(generator, LIGHT)
    assert translator.precision == "exact" and not fast.is_fast(translator.generator)
    assert translator.dtype == torch.float32
    exported = OnnxTranslator.from_file(export_onnx(translator, tmp_path / "as_is.onnx"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        reference_image = build_generator_like(generator)(x)[0]
    assert max_diff(exported.run(x.numpy())[0], reference_image) <= TOLERANCE


def test_run_folder_exports_its_latest_checkpoint(tmp_path):
    run_dir = write_run(tmp_path / "run", LIGHT, steps=(3, 12))
    exported = OnnxTranslator.from_file(export_onnx(run_dir, tmp_path / "run.onnx", "B2A"))
    assert exported.direction == "B2A" and exported.config == LIGHT
    latest = Translator.from_checkpoint(run_dir / "checkpoints" / "step_0000012", "B2A")
    older = Translator.from_checkpoint(run_dir / "checkpoints" / "step_0000003", "B2A")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    image, _ = exported.run(x.numpy())
    with torch.no_grad():
        assert max_diff(image, latest.generator(x)[0]) <= TOLERANCE
        assert max_diff(image, older.generator(x)[0]) > 100 * TOLERANCE
    on_the_fly = load_translator(run_dir, "B2A", backend="onnxruntime")
    assert isinstance(on_the_fly, OnnxTranslator) and on_the_fly.direction == "B2A"
    picture = random_image(32, 32, 6)
    assert np.abs(np.asarray(on_the_fly(picture), np.int16) - np.asarray(latest(picture), np.int16)).max() <= 1
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint") as info:
        export_onnx(tmp_path / "empty", tmp_path / "empty.onnx")
    assert "\n" not in str(info.value) and not (tmp_path / "empty.onnx").exists()


def test_export_refusals(model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="translator translates A2B"):
        export_onnx(model["torch"], tmp_path / "x.onnx", direction="B2A")
    for opset in (0, 12, 999):  # 0 used to mean the default; int8 needs 13; the newest is the installed onnx's
        with pytest.raises(ExportError, match=f"opset={opset}: ugatit writes opsets 13 to"):
            export_onnx(model["torch"], tmp_path / "x.onnx", opset=opset)
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="opset 18 or later"):
        export_onnx(model["torch"], tmp_path / "x.onnx", opset=17, dynamo=True)
    monkeypatch.setattr(export, "MAX_ONNX_BYTES", 1000)
    with pytest.raises(ValueError, match="more than one ONNX file can hold"):
        export_onnx(model["torch"], tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_refuses_foreign_onnx_file(tmp_path):
    node = onnx.helper.make_node("Identity", ["input"], ["image"])
    value = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    out = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    proto = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [value], [out]))
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="not a ugatit ONNX export"):
        OnnxTranslator.from_file(tmp_path / "other.onnx")
    with pytest.raises(FileNotFoundError):
        OnnxTranslator.from_file(tmp_path / "missing.onnx")


@pytest.mark.slow  # about 15 s: the torch.export-based exporter is slow even on a tiny model
def test_dynamo_exporter(tmp_path):
    """The torch.export-based exporter, kept for when PyTorch drops the TorchScript one: same graph contract."""
    pytest.importorskip("onnxscript")
    translator = Translator.from_checkpoint(write_checkpoint(tmp_path / "light.safetensors", LIGHT), "A2B")
    onnx_translator = OnnxTranslator.from_file(export_onnx(translator, tmp_path / "d.onnx", heatmap=True, dynamo=True))
    assert onnx_translator.metadata["opset"] == "18"
    for batch, height, width in [(1, 32, 32), (3, 48, 40)]:
        x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        image, heatmap = onnx_translator.run(x.numpy())
        with torch.no_grad():
            ref_image, _, ref_heatmap = translator.generator(x)
        assert max_diff(image, ref_image) <= TOLERANCE and max_diff(heatmap, ref_heatmap) <= TOLERANCE


def test_cli_onnx_files_and_their_errors(tmp_path, capsys):
    """`ugatit translate` runs an .onnx file without --backend; a damaged file, damaged metadata, a missing heatmap
    output and exports that cannot be done are each one line and exit code 2, before anything is written."""
    from ugatit.cli import main

    checkpoint = write_checkpoint(tmp_path / "light.safetensors", LIGHT)
    exported = export_onnx(checkpoint, tmp_path / "MODEL.ONNX")
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(40, 36, 1).save(photos / "a.png")
    assert main(["translate", str(exported), str(photos), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    capsys.readouterr()
    expected = np.asarray(Translator.from_checkpoint(checkpoint)(Image.open(photos / "a.png")), np.int16)
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "a.png"), np.int16) - expected).max() <= 1

    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(exported.read_bytes()[:1000])
    proto = onnx.load(str(exported))
    kept = [prop for prop in proto.metadata_props if prop.key != "direction"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    undirected = tmp_path / "undirected.onnx"
    onnx.save(proto, str(undirected))
    empty = tmp_path / "empty"
    empty.mkdir()
    export_args = ["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "new.onnx")]
    for args, message in [
        (["translate", str(damaged), str(photos), "--out", str(tmp_path / "o1")], "not a readable ONNX file"),
        (["translate", str(undirected), str(photos), "--out", str(tmp_path / "o2")], "damaged ugatit metadata"),
        (["translate", str(exported), str(photos), "--out", str(tmp_path / "o3"), "--heatmap"], "no heatmap output"),
        ([*export_args, "--direction", "both"], "one generator"),
        ([*export_args, "--opset", "12"], "opset=12"),
        ([*export_args, "--quantize", "int8", "--calibration", str(empty)], "no images to calibrate on"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "new.onnx"))
