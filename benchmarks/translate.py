"""Translation speed: PyTorch with precision exact and fast, and ONNX Runtime.

    python benchmarks/translate.py                          # 256 px, light, ch 64: batch 1 latency and batch 8
    python benchmarks/translate.py --full --batch-size 4
    python benchmarks/translate.py --device cuda
    python benchmarks/translate.py --arch official-tf          # the TF architecture of the authors' released models
    python benchmarks/translate.py --model selfie2anime.safetensors  # a model file's A2B generator
    python benchmarks/translate.py --model m.safetensors --img-size 256 --calibration horse2zebra/testA  # real images

Reports the median ms per image at batch 1 and the images per second at --batch-size, from random weights (speed
does not depend on them) or a model file, alternating the backends in one process, and how far each backend's
8-bit result is from the exact one on a test image. ONNX Runtime runs the fp32 export and its int8 quantization
(`ugatit.quantize`), calibrated on --calibration (synthetic images by default; their error against fp32 on held-out
images of that folder is printed). "official" is the official test-time call: the bare generator
under no_grad in fp32, with the same image decoding and encoding around it. Beside each time: the generator's FLOP
count, the machine's measured peak in the backend's dtype (`machine.peak_gflops`) and the fraction of it reached.
ONNX Runtime is skipped when not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import count_flops, describe_cpu, peak_gflops, peak_int8_gops
from PIL import Image

from ugatit.checkpoint import load_model, read_model_config, save_model
from ugatit.config import ARCHS, FAST_DTYPES, ModelConfig
from ugatit.data import eval_transform, to_image
from ugatit.fast import resolve_dtype
from ugatit.inference import Translator
from ugatit.models import build_generator
from ugatit.synthetic import write_dataset
from ugatit.tuning import enable_huge_pages


def official_translator(checkpoint: Path, device: str):
    """The official test loop's call: the generator as built, in eval mode, fp32, no_grad."""
    config, states = load_model(checkpoint, ["genA2B"])
    generator = build_generator(config)
    generator.load_state_dict(states["genA2B"])
    generator.to(device).eval()

    def translate(images: list[Image.Image]) -> list[Image.Image]:
        x = torch.stack([eval_transform(image, config.img_size, config.keep_aspect) for image in images]).to(device)
        with torch.no_grad():
            out = generator(x)[0]
        return [to_image(y) for y in out.float().cpu()]

    return translate


def timed(translate, images, reps: int) -> list[float]:
    translate(images)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        translate(images)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    enable_huge_pages()  # before torch allocates anything, as `ugatit train` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, help="default 256, or a --model's own (a light one takes any)")
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="full mode (default light)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="official", choices=ARCHS)
    parser.add_argument("--model", help="time this model file's A2B generator instead of random weights")
    parser.add_argument("--calibration", help="int8: folder of input images (default: synthetic ones)")
    parser.add_argument(
        "--fast-dtype",
        default="auto",
        choices=FAST_DTYPES,
        help="the fast backend's compute dtype (auto: bf16 where the device has bf16 hardware)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            checkpoint, config = Path(args.model), read_model_config(args.model)
            if args.img_size is not None and args.img_size != config.img_size:  # a light model runs at any size
                if not config.light:
                    parser.error(f"--img-size: {args.model} is a full-mode model, bound to {config.img_size} px")
                config, states = load_model(checkpoint, ["genA2B"])
                config = dataclasses.replace(config, img_size=args.img_size)
                checkpoint = Path(tmp) / "g.safetensors"
                save_model(checkpoint, states, config)
        else:
            config = ModelConfig(img_size=args.img_size or 256, ch=args.ch, light=not args.full, arch=args.arch)
            torch.manual_seed(0)
            checkpoint = Path(tmp) / "g.safetensors"
            save_model(checkpoint, {"genA2B": build_generator(config).state_dict()}, config)
        fast_dtype = resolve_dtype(args.fast_dtype, args.device)
        backends = {
            "official": official_translator(checkpoint, args.device),
            "torch exact": Translator.from_checkpoint(checkpoint, "A2B", args.device, args.batch_size),
            "torch fast": Translator.from_checkpoint(
                checkpoint, "A2B", args.device, args.batch_size, precision="fast", fast_dtype=args.fast_dtype
            ),
        }
        try:
            from ugatit.export import ExportError, export_onnx
            from ugatit.onnx_runtime import OnnxTranslator
            from ugatit.quantize import quantize_onnx

            onnx_file = export_onnx(checkpoint, Path(tmp) / "g.onnx", "A2B")
            backends["onnxruntime"] = OnnxTranslator.from_file(onnx_file, args.device, args.batch_size)
            if args.device == "cpu":  # the int8 export is for CPUs (VNNI / AMX int8 units)
                synthetic = Path(tmp) / "synthetic"
                calibration = args.calibration or write_dataset(synthetic, config.img_size, 40, 0) / "trainA"
                int8_file = Path(tmp) / "g_int8.onnx"
                report = quantize_onnx(onnx_file, int8_file, calibration)
                backends["onnxruntime int8"] = OnnxTranslator.from_file(int8_file, args.device, args.batch_size)
        except ImportError:
            print("onnxruntime not installed: skipped (pip install 'ugatit[onnx]')")
        except ExportError as error:  # a CPU-only onnxruntime asked for --device cuda
            print(f"onnxruntime skipped: {error}")

        image = Image.new("RGB", (config.img_size, config.img_size), (120, 80, 60))
        single, batch = [image], [image] * args.batch_size
        test = Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (config.img_size, config.img_size, 3), np.uint8)
        )
        results = {name: np.asarray(translator([test])[0], np.int16) for name, translator in backends.items()}
        levels = {name: np.abs(result - results["torch exact"]).mean() for name, result in results.items()}
        latency: dict[str, list[float]] = {name: [] for name in backends}
        throughput: dict[str, list[float]] = {name: [] for name in backends}
        for name, translator in itertools.chain.from_iterable(itertools.repeat(list(backends.items()), 2)):
            latency[name] += timed(translator, single, args.reps)
            throughput[name] += timed(translator, batch, max(1, args.reps // 2))
        generator = backends["torch exact"].generator
        with torch.no_grad():
            flops = count_flops(generator, torch.zeros(1, 3, config.img_size, config.img_size, device=args.device))

    dtypes = {name: "float32" for name in backends} | {"torch fast": str(fast_dtype).removeprefix("torch.")}
    if "onnxruntime int8" in backends:
        dtypes["onnxruntime int8"] = "int8"
    peaks = {
        dtype: peak_int8_gops() if dtype == "int8" else peak_gflops(getattr(torch, dtype), args.device)
        for dtype in dict.fromkeys(dtypes.values())
    }
    print(f"translate, {args.model or 'random weights'}: {config.describe()}; torch {torch.__version__}, "
          f"{args.device}, {describe_cpu()}")  # fmt: skip
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"generator: {flops / 1e9:.1f} GFLOP per image; measured peak (3x3 256-channel conv, 64 x 64): "
          + ", ".join(f"{d} {g:.0f} {'GOP' if d == 'int8' else 'GFLOP'}/s" for d, g in peaks.items()))  # fmt: skip
    if "onnxruntime int8" in backends:
        print(f"int8 ({args.calibration or 'synthetic images'}): {report.describe()}")
    batch_title = f"images/s (batch {args.batch_size})"
    print(f"{'backend':<17}{'dtype':>9}{'ms/image (batch 1)':>20}{'x official':>12}{'of peak':>9}{batch_title:>22}"
          f"{'mean |x - exact| (8-bit)':>27}")  # fmt: skip
    official_ms = statistics.median(latency["official"]) * 1000
    for name in backends:
        ms = statistics.median(latency[name]) * 1000
        ips = args.batch_size / statistics.median(throughput[name])
        dtype = dtypes[name]
        fraction = flops / (ms / 1000) / (peaks[dtype] * 1e9)
        print(f"{name:<17}{dtype:>9}{ms:>20.1f}{official_ms / ms:>12.2f}"
              f"{fraction:>9.0%}{ips:>22.2f}{levels.get(name, 0.0):>27.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
