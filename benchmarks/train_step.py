"""Training-step speed and memory: the official update rule, our exact fp32 path and our fast path, side by side.

    python benchmarks/train_step.py --img-size 128 --light            # 2-core CPU target
    python benchmarks/train_step.py --img-size 256 --light --reps 3
    python benchmarks/train_step.py --img-size 256 --device cuda      # full mode on a GPU

Timings alternate between the paths inside one process (so machine noise hits them alike) and report the median
seconds per step. Peak memory is measured per path in a fresh child process over --memory-steps steps (peak RSS on
CPU, peak allocated on CUDA), so that each figure belongs to one path alone. "official" restates the official loop
on the same networks: 8 generator passes per step, fakes not detached in the D update, discriminator weight
gradients in the G update, under PyTorch's default settings as the official code runs (on a GPU that lets cuDNN
compute fp32 convolutions in TF32, which ugatit's paths never do).

Beside each time: the step's FLOP count (the official loop's own for "official"; the ugatit step's, counted on the
exact path, for "exact" and "fast", whose kernels do the same work in fewer operations where they use Winograd), the
machine's measured peak in the path's dtype (`machine.peak_gflops`) and the fraction of it reached.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from machine import count_flops, describe_cpu, peak_gflops

from ugatit.config import FAST_DTYPES, configs
from ugatit.fast import native_bf16, resolve_dtype
from ugatit.losses import JUDGES, discriminator_losses, generator_losses
from ugatit.norms import clip_rho
from ugatit.trainer import Trainer
from ugatit.tuning import enable_huge_pages

PATHS = ("official", "exact", "fast")


def official_step(trainer: Trainer, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
    """The official UGATIT.train() iteration: fakes recomputed in the G update and not detached in the D update."""
    nets, run = trainer.nets, trainer.run
    real = {"A": real_A, "B": real_B}
    trainer.opt_D.zero_grad()
    fake = {"B": nets["genA2B"](real_A)[0], "A": nets["genB2A"](real_B)[0]}
    real_scores = {name: nets[f"dis{name}"](real[domain]) for name, domain in JUDGES}
    fake_scores = {name: nets[f"dis{name}"](fake[domain]) for name, domain in JUDGES}
    discriminator_losses(real_scores, fake_scores, run)["d_loss"].backward()
    trainer.opt_D.step()
    trainer.opt_G.zero_grad()
    (fake_A2B, cam_A2B, _), (fake_B2A, cam_B2A, _) = nets["genA2B"](real_A), nets["genB2A"](real_B)
    fake = {"A": fake_B2A, "B": fake_A2B}
    cycled = {"A": nets["genB2A"](fake_A2B)[0], "B": nets["genA2B"](fake_B2A)[0]}
    identity = {"A": nets["genB2A"](real_A), "B": nets["genA2B"](real_B)}
    fake_scores = {name: nets[f"dis{name}"](fake[domain]) for name, domain in JUDGES}
    terms = generator_losses(
        fake_scores, real, cycled, {d: out[0] for d, out in identity.items()}, {"A": cam_B2A, "B": cam_A2B},
        {d: out[1] for d, out in identity.items()}, run,
    )  # fmt: skip
    terms["g_loss"].backward()
    trainer.opt_G.step()
    for name in ("genA2B", "genB2A"):
        clip_rho(nets[name])


def make(path: str, args: argparse.Namespace) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    model, run = configs(
        img_size=args.img_size, ch=args.ch, n_res=args.n_res, light=args.light, batch_size=args.batch_size,
        precision="fast" if path == "fast" else "exact", fast_dtype=args.fast_dtype,
        compile=args.compile and path == "fast",
        grad_checkpoint=args.grad_checkpoint and path == "fast",
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(model, run, args.device)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    real_A = torch.rand(shape, device=args.device) * 2 - 1
    real_B = torch.rand(shape, device=args.device) * 2 - 1
    return trainer, real_A, real_B


def run_step(path: str, trainer: Trainer, real_A: torch.Tensor, real_B: torch.Tensor) -> float:
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if path == "official":
        official_step(trainer, real_A, real_B)
    else:
        trainer.train_step(real_A, real_B)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_child(path: str, args: argparse.Namespace) -> None:
    """Runs in a fresh process: --memory-steps steps of one path, then prints its peak memory in bytes."""
    trainer, real_A, real_B = make(path, args)
    for _ in range(args.memory_steps):
        run_step(path, trainer, real_A, real_B)
    if trainer.device.type == "cuda":
        print(torch.cuda.max_memory_allocated())
    else:
        print(peak_rss())


def peak_rss() -> int:
    """This process's peak RSS. Linux's ru_maxrss survives fork + exec (a child would report its parent's peak);
    VmHWM in /proc belongs to the new address space alone."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    enable_huge_pages()  # before torch allocates anything, as `ugatit train` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--n-res", type=int, default=4)
    parser.add_argument("--light", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument(
        "--fast-dtype",
        default="auto",
        choices=FAST_DTYPES,
        help="the fast path's compute dtype (auto: bf16 where the device has bf16 hardware)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing on the fast path")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-path peak-memory runs")
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=6,
        help="steps in each peak-memory run: on CPU the C heap's peak keeps rising over the first steps",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args)
        return

    paths = args.paths.split(",")
    setups = {path: make(path, args) for path in paths}
    times: dict[str, list[float]] = {path: [] for path in paths}
    warmup = {path: run_step(path, *setups[path]) for path in paths}
    for path in itertools.chain.from_iterable(itertools.repeat(paths, args.reps)):
        times[path].append(run_step(path, *setups[path]))
    del setups

    memory = {}
    if not args.no_memory:
        child_args = [a for a in sys.argv[1:]]
        for path in paths:
            out = subprocess.run(
                [sys.executable, __file__, *child_args, "--memory-child", path], capture_output=True, text=True
            )
            memory[path] = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None

    fast_dtype = resolve_dtype(args.fast_dtype, args.device)
    counted = {p: "official" if p == "official" else "exact" for p in paths}
    flops = {p: count_flops(run_step, p, *make(p, args)) for p in set(counted.values())}
    dtypes = {p: fast_dtype if p == "fast" else torch.float32 for p in paths}
    peaks = {dtype: peak_gflops(dtype, args.device) for dtype in set(dtypes.values())}

    mode = "light" if args.light else "full"
    print(f"train step, {args.img_size} px, ch {args.ch}, n_res {args.n_res}, {mode}, batch {args.batch_size}")
    if not args.no_memory:
        print(f"peak memory over {args.memory_steps} steps, each path in a fresh process")
    print(f"torch {torch.__version__}, {args.device}, {describe_cpu()}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(
        f"fast path computes in {fast_dtype} (--fast-dtype {args.fast_dtype}; native bf16: {native_bf16(args.device)})"
    )
    print("step FLOPs: " + ", ".join(f"{p} {f / 1e12:.2f} TFLOP" for p, f in flops.items()) + "; measured peak "
          "(3x3 256-channel conv, 64 x 64): " + ", ".join(f"{str(d).removeprefix('torch.')} {g:.0f} GFLOP/s"
                                                         for d, g in peaks.items()))  # fmt: skip
    reference = "official" if "official" in paths else paths[0]  # speed-up and memory against this path
    base, base_memory = statistics.median(times[reference]), memory.get(reference)
    print(f"{'path':<10}{'dtype':>10}{'median s/step':>15}{'speed-up':>10}{'of peak':>9}{'warm-up s':>11}"
          f"{'peak memory':>14}{'memory ratio':>14}   (ratios against {reference})")  # fmt: skip
    for path in paths:
        median = statistics.median(times[path])
        mem = f"{memory[path] / 2**30:.2f} GiB" if memory.get(path) else "failed" if path in memory else "-"
        ratio = f"{memory[path] / base_memory:.2f}" if memory.get(path) and base_memory else "-"
        fraction = flops[counted[path]] / median / (peaks[dtypes[path]] * 1e9)
        print(f"{path:<10}{str(dtypes[path]).removeprefix('torch.'):>10}{median:>15.3f}{base / median:>9.1f}x"
              f"{fraction:>9.0%}{warmup[path]:>11.2f}{mem:>14}{ratio:>14}")  # fmt: skip
    print(json.dumps({"args": vars(args), "median_s": {p: statistics.median(t) for p, t in times.items()},
                      "peak_bytes": memory, "flops": flops, "dtypes": {p: str(d) for p, d in dtypes.items()},
                      "peak_gflops": {str(d): g for d, g in peaks.items()}, "machine": describe_cpu()}))  # fmt: skip


if __name__ == "__main__":
    main()
