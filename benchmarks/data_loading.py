"""Data loading against the training step: does the step ever wait for its batches?

    python benchmarks/data_loading.py --data ../shared/datasets/horse2zebra --img-size 128
    python benchmarks/data_loading.py                    # the built-in synthetic dataset, written to a temp folder

Part 1 times the loader alone on trainA: its start-up (workers, and decoding every image when cached) and then
milliseconds per batch, for each --workers and cache setting. Part 2 runs the real training loop
(`ugatit.train.train`, fast path) for --steps steps per --workers setting and reports what it logs: the seconds per
step spent waiting for the two batches (`data_s` in log.jsonl) against the seconds in the step itself (`step_s`).
The first step is left out of the means: it includes the workers' start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_cpu

from ugatit.config import configs
from ugatit.data import infinite_batches, list_images
from ugatit.synthetic import write_dataset
from ugatit.train import train
from ugatit.tuning import enable_huge_pages

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra"


def loader_alone(paths: list[Path], args: argparse.Namespace, workers: int, cache: bool) -> tuple[float, float]:
    """Seconds to the first batch, and median milliseconds per batch after it."""
    start = time.perf_counter()
    batches = infinite_batches(paths, args.img_size, args.batch_size, seed=0, num_workers=workers, cache=cache)
    next(batches)
    startup = time.perf_counter() - start
    times = []
    for _ in range(args.batches):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    return startup, statistics.median(times) * 1e3


def training_loop(data: Path, args: argparse.Namespace, workers: int) -> tuple[float, float]:
    """Mean data_s and step_s of a short real run, its first step left out."""
    model, run_config = configs(
        img_size=args.img_size, light=args.light, batch_size=args.batch_size, precision="fast", iterations=args.steps,
        log_every=1, save_every=10**9, sample_every=10**9, num_workers=workers,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as run:
        train(model, run_config, data, run, progress=False, echo=lambda message: None)
        entries = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()][1:]
    return statistics.mean(e["data_s"] for e in entries), statistics.mean(e["step_s"] for e in entries)


def main() -> None:
    enable_huge_pages()  # before torch allocates anything, as `ugatit train` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help=f"a folder with trainA/trainB (default: {SHARED_DATA} if present)")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--light", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers settings to compare")
    parser.add_argument("--batches", type=int, default=50, help="batches timed per loader setting (part 1)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per workers setting (part 2)")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is left out of the means")

    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or (SHARED_DATA if SHARED_DATA.is_dir() else None)
        if data is None:
            data = write_dataset(Path(scratch) / "synthetic", size=args.img_size, n_train=200, n_test=4)
        paths = list_images(data / "trainA")
        print(f"data: {data} ({len(paths)} images in trainA), {args.img_size} px, batch {args.batch_size}")
        print(f"torch {torch.__version__}, {describe_cpu()}")
        print("\nloader alone (trainA)")
        print(f"{'workers':>8}{'cache':>7}{'start-up s':>12}{'ms/batch':>10}")
        for count in workers:
            for cache in (True, False):
                startup, per_batch = loader_alone(paths, args, count, cache)
                print(f"{count:>8}{'yes' if cache else 'no':>7}{startup:>12.2f}{per_batch:>10.2f}")
        mode = "light" if args.light else "full"
        print(f"\ntraining loop, {mode}, fast path, steps 2-{args.steps} (cache_images auto)")
        print(f"{'workers':>8}{'data_s':>10}{'step_s':>10}{'waiting':>9}")
        for count in workers:
            data_s, step_s = training_loop(data, args, count)
            print(f"{count:>8}{data_s:>10.4f}{step_s:>10.3f}{data_s / (data_s + step_s):>9.1%}")


if __name__ == "__main__":
    main()
