"""int8 ONNX files (`ugatit.quantize`): their error against the fp32 export within a stated tolerance, measured here
independently of the report; int8 convolutions in the file; the variants (heatmap, uint8) kept; the CLI and its
refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from ugatit.checkpoint import save_model  # noqa: E402
from ugatit.cli import main  # noqa: E402
from ugatit.config import ModelConfig  # noqa: E402
from ugatit.data import eval_transform  # noqa: E402
from ugatit.export import ExportError, export_onnx  # noqa: E402
from ugatit.models import build_networks  # noqa: E402
from ugatit.onnx_runtime import OnnxTranslator  # noqa: E402
from ugatit.quantize import quantize_onnx  # noqa: E402
from ugatit.synthetic import write_dataset  # noqa: E402

CONFIG = ModelConfig(img_size=64, ch=8, n_res=1, light=True, global_layers=5, local_layers=4)
# int8 against fp32 on images of the calibration domain, in 8-bit levels: bounds with room for this small random
# model's rounding on any CPU kind; a trained 256 px model's figures are in docs/performance.md.
MIN_PSNR_DB = 32.0
MAX_MEAN_LEVELS = 4.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize")
    data = write_dataset(folder / "data", size=64, n_train=24, n_test=6)
    torch.manual_seed(0)
    nets = build_networks(CONFIG)
    model = folder / "model.safetensors"
    save_model(model, {name: nets[name].state_dict() for name in ("genA2B", "genB2A")}, CONFIG)
    fp32 = export_onnx(model, folder / "fp32.onnx", "A2B", heatmap=True)
    report = quantize_onnx(fp32, folder / "int8.onnx", data / "trainA", images=16)
    return {
        "folder": folder,
        "data": data,
        "model": model,
        "fp32": fp32,
        "int8": folder / "int8.onnx",
        "report": report,
    }


def levels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / ((a - b) ** 2).mean()))


def test_int8_within_tolerance_of_fp32_on_unseen_images(files):
    """Measured here on the test images (never calibrated on), through the translators users call."""
    fp32, int8 = OnnxTranslator.from_file(files["fp32"]), OnnxTranslator.from_file(files["int8"])
    pictures = [Image.open(path).convert("RGB") for path in sorted((files["data"] / "testA").iterdir())]
    a = np.stack([levels(image) for image in fp32(pictures)])
    b = np.stack([levels(image) for image in int8(pictures)])
    assert psnr(a, b) >= MIN_PSNR_DB
    assert np.abs(a - b).mean() <= MAX_MEAN_LEVELS
    assert np.abs(a - b).mean() > 0  # it really is another computation


def test_report_says_what_it_measured(files):
    report = files["report"]
    assert report.calibration_images == 16 and report.compared == 8 and report.held_out and report.skipped == 0
    assert report.psnr_db >= MIN_PSNR_DB and 0 < report.mean_abs <= MAX_MEAN_LEVELS
    assert report.max_abs >= report.mean_abs
    assert f"PSNR {report.psnr_db:.1f} dB" in report.describe()


def assert_int8_convolutions(path) -> None:
    """Every convolution but the RGB output layer reads int8 weights (and int32 biases, where it has any) through
    DequantizeLinear: the QDQ form that ONNX Runtime turns into its int8 kernel. The output layer, with its three
    output channels, keeps fp32 weights (ONNX Runtime's int8 kernel is slow on so narrow an output) and runs on
    2 x 2 blocks of its input: 12 output channels between a SpaceToDepth and a DepthToSpace."""
    proto = onnx.load(str(path))
    initializers = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers = {name: node for node in proto.graph.node for name in node.input}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert len(convs) > 2
    for conv in convs:
        if conv.input[1] in initializers:  # a float weight: only the RGB output layer
            assert initializers[conv.input[1]].dims[0] == 4 * 3
            assert initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT
            assert producers[conv.input[0]].op_type == "SpaceToDepth"
            assert consumers[conv.output[0]].op_type == "DepthToSpace"
            continue
        for name, dtype in zip(conv.input[1:], (onnx.TensorProto.INT8, onnx.TensorProto.INT32), strict=False):
            dequantize = producers[name]
            assert dequantize.op_type == "DequantizeLinear"
            assert initializers[dequantize.input[0]].data_type == dtype
        # 7-bit weights: a pair of uint8 x int8 products fits the 16-bit sums of CPUs without VNNI (2 x 255 x 64)
        weights = onnx.numpy_helper.to_array(initializers[producers[conv.input[1]].input[0]])
        assert np.abs(weights.astype(np.int32)).max() <= 64
    assert sum(conv.input[1] in initializers for conv in convs) == 1


# Runs an ONNX file's first output on a saved batch, on the emulated CPU: argv = file, inputs .npy, outputs .npy.
_RUN_FILE = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[2])})[0])
"""


def test_int8_file_computes_the_same_on_a_cpu_without_vnni(files, tmp_path, on_avx2_cpu):
    """Without VNNI, ONNX Runtime's int8 convolutions add pairs of uint8 x int8 products in 16 bits with
    saturation; the file's 7-bit weights keep every pair in range, so an AVX2 CPU computes what this one does. With
    8-bit weights this test fails (tried)."""
    pictures = sorted((files["data"] / "testA").iterdir())
    batch = torch.stack([eval_transform(Image.open(p).convert("RGB"), CONFIG.img_size) for p in pictures]).numpy()
    np.save(tmp_path / "x.npy", batch)
    on_avx2_cpu(_RUN_FILE, str(files["int8"]), str(tmp_path / "x.npy"), str(tmp_path / "avx2.npy"))
    session = onnxruntime.InferenceSession(str(files["int8"]), providers=["CPUExecutionProvider"])
    here, avx2 = session.run(None, {session.get_inputs()[0].name: batch})[0], np.load(tmp_path / "avx2.npy")
    assert here.shape == (len(pictures), 3, 64, 64)
    # The fp32 parts of the graph may round differently there: a fraction of an 8-bit level (1 / 127.5) at most.
    assert np.abs(here - avx2).max() <= 1e-4


def test_pads_and_upsampling_run_on_uint8_maps(files):
    """Reflection pads and nearest upsampling only copy values, so the int8 file runs them on the quantized maps
    (ONNX Runtime would otherwise dequantize, copy in fp32 and quantize again), and the size queries of the exported
    norms read the quantized maps instead of a dequantized copy."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(files["int8"])))
    dtypes = {info.name: info.type.tensor_type.elem_type for info in proto.graph.value_info}
    producers = {out: node for node in proto.graph.node for out in node.output}
    moves = [node for node in proto.graph.node if node.op_type in ("Pad", "Resize")]
    assert {node.op_type for node in moves} == {"Pad", "Resize"}
    for node in moves:
        assert dtypes[node.input[0]] == dtypes[node.output[0]] == onnx.TensorProto.UINT8, node.name
    shapes = [node for node in proto.graph.node if node.op_type == "Shape"]
    assert shapes and not any(producers[node.input[0]].op_type == "DequantizeLinear" for node in shapes)


def test_output_layer_on_blocks_is_the_fp32_layer(files):
    """The int8 file's RGB output layer, rearranged to run on 2 x 2 blocks of its input, computes the fp32 export's
    layer: its output against the fp32 weights applied to the same input, read from the file's own tensors."""
    proto = onnx.load(str(files["int8"]))
    blocks_in = next(node for node in proto.graph.node if node.op_type == "SpaceToDepth")
    blocks_out = next(node for node in proto.graph.node if node.op_type == "DepthToSpace")
    del proto.graph.output[:]
    proto.graph.output.extend(
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in (blocks_in.input[0], blocks_out.output[0])]
    )  # fmt: skip
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    layer_in, layer_out = session.run(None, {session.get_inputs()[0].name: x})
    fp32 = onnx.load(str(files["fp32"]))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fp32.graph.initializer}
    rgb = next(n for n in fp32.graph.node if n.op_type == "Conv" and weights.get(n.input[1], np.zeros(9)).shape[0] == 3)
    bias = torch.tensor(weights[rgb.input[2]]) if len(rgb.input) > 2 else None
    expected = torch.nn.functional.conv2d(torch.tensor(layer_in), torch.tensor(weights[rgb.input[1]]), bias)
    assert layer_out.shape == expected.shape == (2, 3, 64, 64)
    assert np.abs(layer_out - expected.numpy()).max() <= 1e-4 * max(1.0, np.abs(expected.numpy()).max())


def test_unreadable_files_are_skipped_and_counted(files, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((files["data"] / "trainA").iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    report = quantize_onnx(files["fp32"], tmp_path / "m.onnx", folder, images=8)
    assert report.skipped == 1 and report.calibration_images == 3 and not report.held_out
    assert "1 unreadable file(s) skipped" in report.describe() and "calibration (the folder had no others)" in (
        report.describe()
    )


def test_convolutions_hold_int8_weights_and_the_outputs_stay(files):
    assert_int8_convolutions(files["int8"])
    translator = OnnxTranslator.from_file(files["int8"])
    assert translator.has_heatmap and translator.metadata["precision"] == "int8"
    assert translator.direction == "A2B" and translator.config == CONFIG
    image, heatmap = translator.translate_with_heatmap(Image.new("RGB", (64, 64), (90, 120, 30)))
    assert image.size == (64, 64) and heatmap.size == (64, 64)


def test_uint8_export_quantizes_too(files, tmp_path):
    uint8 = export_onnx(files["model"], tmp_path / "u8.onnx", "A2B", uint8=True)
    quantize_onnx(uint8, tmp_path / "u8_int8.onnx", files["data"] / "trainA", images=8)
    a = OnnxTranslator.from_file(uint8)(Image.open(files["data"] / "testA" / "0000.png").convert("RGB"))
    b = OnnxTranslator.from_file(tmp_path / "u8_int8.onnx")(Image.open(files["data"] / "testA" / "0000.png"))
    assert psnr(levels(a), levels(b)) >= MIN_PSNR_DB


def test_tf_architecture_quantizes_every_convolution(files, tmp_path):
    """A TF-architecture generator (the authors' released models): biased convolutions, whose equal initial biases
    the exporter stores once; each convolution must still get its own int8 weights and int32 bias."""
    config = ModelConfig(img_size=96, ch=4, n_res=1, light=True, arch="official-tf")
    torch.manual_seed(0)
    model = tmp_path / "tf.safetensors"
    save_model(model, {"genA2B": build_networks(config)["genA2B"].state_dict()}, config)
    fp32 = export_onnx(model, tmp_path / "tf.onnx", "A2B")
    quantize_onnx(fp32, tmp_path / "tf_int8.onnx", files["data"] / "trainA", images=8)
    assert_int8_convolutions(tmp_path / "tf_int8.onnx")
    picture = Image.open(files["data"] / "testA" / "0000.png").convert("RGB")
    a, b = (OnnxTranslator.from_file(tmp_path / name)(picture) for name in ("tf.onnx", "tf_int8.onnx"))
    assert psnr(levels(a), levels(b)) >= MIN_PSNR_DB


def test_refusals_write_nothing(files, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(ExportError, match="already int8"):
        quantize_onnx(files["int8"], out, files["data"] / "trainA")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    with pytest.raises(ExportError, match="no readable images"):
        quantize_onnx(files["fp32"], out, tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        quantize_onnx(tmp_path / "missing.onnx", out, files["data"] / "trainA")
    with pytest.raises(ExportError, match="at least 1 image"):
        quantize_onnx(files["fp32"], out, files["data"] / "trainA", images=0)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(files["fp32"].read_bytes()[:500])
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        quantize_onnx(damaged, out, files["data"] / "trainA")
    assert not out.exists()
    source = files["fp32"].read_bytes()
    with pytest.raises(ExportError, match="the fp32 source itself"):
        quantize_onnx(files["fp32"], files["fp32"], files["data"] / "trainA")
    assert files["fp32"].read_bytes() == source


def test_cli(files, tmp_path, capsys):
    def args(target):
        return ["export", str(files["model"]), "--format", "onnx", "--out", str(target), "--direction", "B2A"]

    out = tmp_path / "cli.onnx"
    calibration = ["--quantize", "int8", "--calibration", str(files["data"] / "trainB"), "--calibration-images", "8"]
    assert main([*args(out), *calibration]) == 0
    printed = capsys.readouterr().out
    assert "in int8" in printed and "PSNR" in printed and "8 held-out" in printed
    assert OnnxTranslator.from_file(out).direction == "B2A"
    for bad, message in [
        (["--quantize", "int8"], "--calibration FOLDER"),
        (["--calibration", str(files["data"] / "trainB")], "--calibration is for --quantize"),
        (["--quantize", "int8", "--calibration", str(tmp_path / "nowhere")], "is not a folder"),
    ]:
        target = tmp_path / "refused.onnx"
        assert main([*args(target), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not target.exists()
    assert main([*args(out), *calibration]) == 2  # the file exists: never overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
