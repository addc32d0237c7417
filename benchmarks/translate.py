"""Translation speed: PyTorch with precision exact and fast, and ONNX Runtime.

    python benchmarks/translate.py                          # 256 px, light, ch 64: batch 1 latency and batch 8
    python benchmarks/translate.py --full --batch-size 4
    python benchmarks/translate.py --device cuda
    python benchmarks/translate.py --arch official-tf          # the TF architecture of the authors' released models
    python benchmarks/translate.py --model selfie2anime.safetensors  # a model file's A2B generator

Reports the median ms per image at batch 1 and the images per second at --batch-size, from random weights (speed
does not depend on them) or a model file, alternating the backends in one process, and how far each backend's
8-bit result is from the exact one on a test image. ONNX Runtime is skipped when not installed.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ugatit.checkpoint import read_model_config, save_model
from ugatit.config import ARCHS, FAST_DTYPES, ModelConfig
from ugatit.fast import resolve_dtype
from ugatit.inference import Translator
from ugatit.models import build_generator
from ugatit.tuning import enable_huge_pages


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
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="full mode (default light)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="official", choices=ARCHS)
    parser.add_argument("--model", help="time this model file's A2B generator instead of random weights")
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
        else:
            config = ModelConfig(img_size=args.img_size, ch=args.ch, light=not args.full, arch=args.arch)
            torch.manual_seed(0)
            checkpoint = Path(tmp) / "g.safetensors"
            save_model(checkpoint, {"genA2B": build_generator(config).state_dict()}, config)
        fast_dtype = resolve_dtype(args.fast_dtype, args.device)
        backends = {
            "torch exact": Translator.from_checkpoint(checkpoint, "A2B", args.device, args.batch_size),
            "torch fast": Translator.from_checkpoint(
                checkpoint, "A2B", args.device, args.batch_size, precision="fast", fast_dtype=args.fast_dtype
            ),
        }
        try:
            from ugatit.export import export_onnx
            from ugatit.onnx_runtime import OnnxTranslator

            onnx_file = export_onnx(checkpoint, Path(tmp) / "g.onnx", "A2B")
            backends["onnxruntime"] = OnnxTranslator.from_file(onnx_file, args.device, args.batch_size)
        except ImportError:
            print("onnxruntime not installed: skipped (pip install 'ugatit[onnx]')")

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

    print(f"translate, {args.model or 'random weights'}: {config.describe()}; torch {torch.__version__}, "
          f"{args.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"torch fast in {fast_dtype}")  # fmt: skip
    batch_title = f"images/s (batch {args.batch_size})"
    print(f"{'backend':<14}{'ms/image (batch 1)':>20}{batch_title:>22}{'mean |x - exact| (8-bit)':>28}")
    for name in backends:
        ms = statistics.median(latency[name]) * 1000
        ips = args.batch_size / statistics.median(throughput[name])
        print(f"{name:<14}{ms:>20.1f}{ips:>22.2f}{levels[name]:>28.2f}")


if __name__ == "__main__":
    main()
