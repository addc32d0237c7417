"""Translation speed: PyTorch with precision exact and fast, and ONNX Runtime.

    python benchmarks/translate.py                          # 256 px, light, ch 64: batch 1 latency and batch 8
    python benchmarks/translate.py --full --batch-size 4
    python benchmarks/translate.py --device cuda

Reports the median ms per image at batch 1 and the images per second at --batch-size, from random weights (speed
does not depend on them), alternating the backends in one process. ONNX Runtime is skipped when not installed.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ugatit.checkpoint import save_model
from ugatit.config import FAST_DTYPES, ModelConfig
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
    parser.add_argument(
        "--fast-dtype",
        default="auto",
        choices=FAST_DTYPES,
        help="the fast backend's compute dtype (auto: bf16 where the device has bf16 hardware)",
    )
    args = parser.parse_args()

    config = ModelConfig(img_size=args.img_size, ch=args.ch, light=not args.full)
    torch.manual_seed(0)
    generator = build_generator(config)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "g.safetensors"
        save_model(checkpoint, {"genA2B": generator.state_dict()}, config)
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

        image = Image.new("RGB", (args.img_size, args.img_size), (120, 80, 60))
        single, batch = [image], [image] * args.batch_size
        latency: dict[str, list[float]] = {name: [] for name in backends}
        throughput: dict[str, list[float]] = {name: [] for name in backends}
        for name, translator in itertools.chain.from_iterable(itertools.repeat(list(backends.items()), 2)):
            latency[name] += timed(translator, single, args.reps)
            throughput[name] += timed(translator, batch, max(1, args.reps // 2))

    mode = "full" if args.full else "light"
    print(f"translate, {args.img_size} px, ch {args.ch}, {mode}; torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"torch fast in {fast_dtype}")  # fmt: skip
    print(f"{'backend':<14}{'ms/image (batch 1)':>20}{f'images/s (batch {args.batch_size})':>22}")
    for name in backends:
        ms = statistics.median(latency[name]) * 1000
        ips = args.batch_size / statistics.median(throughput[name])
        print(f"{name:<14}{ms:>20.1f}{ips:>22.2f}")


if __name__ == "__main__":
    main()
