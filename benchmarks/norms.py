"""Exact vs fused (vs torch.compile) ILN / AdaILN / InstanceNorm at the shapes of the light ch-64 generator.

    python benchmarks/norms.py                      # CPU, fp32 + bf16, NCHW + channels_last, exact vs fused
    python benchmarks/norms.py --compile            # also torch.compile of the exact formula (slow to compile)
    python benchmarks/norms.py --device cuda --reps 50

Times forward (no_grad) and forward + backward (grads for x and every parameter), one call per variant in turn
(interleaved, so that load from other jobs hits all variants alike), and prints medians in ms. bf16 rows run under
autocast with a bf16 input, as the layers see it in mixed-precision training: the exact formula then computes its
statistics in bf16 and returns fp32; the fused path computes them in fp32 and returns bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from machine import describe_cpu

from ugatit.fast.norms import instance_layer_norm_fused, instance_norm_fused
from ugatit.norms import instance_layer_norm

# (name, kind, B, C, H, W): AdaILN of the residual decoder blocks, ILN of the two upsampling blocks, InstanceNorm of
# the encoder, for 128 px and 256 px inputs of the light ch-64 generator.
SHAPES = [
    ("AdaILN 128px", "iln", 1, 256, 32, 32),
    ("AdaILN 256px", "iln", 1, 256, 64, 64),
    ("ILN-1 128px", "iln", 1, 128, 64, 64),
    ("ILN-1 256px", "iln", 1, 128, 128, 128),
    ("ILN-2 128px", "iln", 1, 64, 128, 128),
    ("ILN-2 256px", "iln", 1, 64, 256, 256),
    ("IN enc 128px", "in", 1, 64, 128, 128),
    ("IN enc 256px", "in", 1, 64, 256, 256),
    ("IN res 128px", "in", 1, 256, 32, 32),
    ("IN res 256px", "in", 1, 256, 64, 64),
]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_case(kind, b, c, h, w, dtype, channels_last, device, batch):
    b = batch or b
    x = torch.randn(b, c, h, w, device=device) * 1.5 + 0.3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    grad = torch.randn_like(x)
    params = []
    if kind == "iln":
        rho = torch.rand(1, c, 1, 1, device=device).requires_grad_()
        # AdaILN gets per-sample gamma/beta from the MLP (bf16 under autocast), ILN per-channel fp32 parameters.
        gb = b if c == 256 else 1
        gamma = (1 + 0.1 * torch.randn(gb, c, 1, 1, device=device)).to(dtype if gb == b else torch.float32)
        beta = (0.1 * torch.randn(gb, c, 1, 1, device=device)).to(gamma.dtype)
        params = [rho, gamma.requires_grad_(), beta.requires_grad_()]
    return x, params, grad


def instance_norm(x):
    return F.instance_norm(x)


def variants(kind, compile_too):
    exact = instance_layer_norm if kind == "iln" else instance_norm
    out = {"exact": exact, "fused": instance_layer_norm_fused if kind == "iln" else instance_norm_fused}
    if compile_too:
        # A fresh compilation per case: one compiled function reused across shapes, dtypes, autocast and grad modes
        # hits dynamo's recompile limit (8) and silently falls back to eager.
        torch._dynamo.reset()
        out["compiled"] = torch.compile(exact)
    return out


def bench_case(fns, x, params, grad, autocast, reps, device, clock=time.perf_counter):
    def fwd(fn):
        with torch.no_grad(), autocast():
            fn(x, *params)

    def fwd_bwd(fn):
        with autocast():
            out = fn(x, *params)
        out.backward(grad.to(out.dtype))

    results = {}
    for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        times = {name: [] for name in fns}
        for fn in fns.values():  # warm-up (and compilation)
            for _ in range(2):
                step(fn)
        for _ in range(reps):
            for name, fn in fns.items():
                x.grad = None  # every variant writes fresh gradients (no accumulation pass)
                for p in params:
                    p.grad = None
                sync(device)
                t0 = clock()
                step(fn)
                sync(device)
                times[name].append(clock() - t0)
        results[mode] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every shape")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the exact formula")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layouts", default="nchw,nhwc")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time, which ignores time the process spends preempted by other "
        "jobs on a shared machine (use with --threads 1: with more threads it also counts OpenMP spin-waits)",
    )
    parser.add_argument("--only", default=None, help="substring filter on the shape names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, device {args.device}, reps {args.reps}, clock {args.clock}, medians in ms")
    print(describe_cpu())
    if args.device == "cpu":
        print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    header = f"{'shape':<14} {'dtype':<5} {'layout':<6} {'mode':<8}" + "".join(
        f" {n:>9}" for n in ("exact", "fused", "compiled", "speedup")
    )
    print(header)
    print("-" * len(header))
    for name, kind, b, c, h, w in SHAPES:
        if args.only and args.only not in name:
            continue
        for dtype_name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            for layout in args.layouts.split(","):
                x, params, grad = make_case(kind, b, c, h, w, dtype, layout == "nhwc", args.device, args.batch)
                if dtype == torch.bfloat16:

                    def autocast(device=args.device):
                        return torch.autocast(device, dtype=torch.bfloat16)
                else:
                    autocast = contextlib.nullcontext
                fns = variants(kind, args.compile)
                try:
                    t0 = time.perf_counter()
                    res = bench_case(fns, x, params, grad, autocast, args.reps, args.device, clock)
                except Exception as exc:  # compile failures are reported, not fatal
                    print(f"{name:<14} {dtype_name:<5} {layout:<6} failed: {type(exc).__name__}: {exc}"[:200])
                    continue
                if args.compile:
                    print(f"  (case incl. compilation: {time.perf_counter() - t0:.0f} s wall)")
                for mode, r in res.items():
                    cols = "".join(f" {r[k]:9.3f}" if k in r else f" {'-':>9}" for k in ("exact", "fused", "compiled"))
                    print(f"{name:<14} {dtype_name:<5} {layout:<6} {mode:<8}{cols} {r['exact'] / r['fused']:8.1f}x")


if __name__ == "__main__":
    main()
