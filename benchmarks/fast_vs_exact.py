"""Does the fast path learn like the exact one? Both train from the same weights on the same real batches.

    python benchmarks/fast_vs_exact.py --data ../shared/datasets/horse2zebra --img-size 128 --steps 200 --window 40

Each step feeds one pair of batches to both trainers, so any difference comes from the arithmetic alone (bf16
autocast where chosen, fused kernels, batched passes). Prints the mean of every loss term per window of steps for
both paths and their relative difference, then the means over all steps against their step-to-step noise,
and writes every step's terms to --out (JSON lines) for plotting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import torch
from machine import describe_cpu

from ugatit.config import FAST_DTYPES, configs
from ugatit.data import infinite_batches, list_images
from ugatit.trainer import Trainer
from ugatit.tuning import enable_huge_pages

TERMS = (
    "d_loss", "g_loss", "D_ad_loss_GA", "D_ad_loss_LB", "G_ad_loss_GA", "G_ad_loss_LB",
    "G_recon_loss_A", "G_recon_loss_B", "G_identity_loss_A", "G_cam_loss_A", "G_cam_loss_B",
)  # fmt: skip


def main() -> None:
    enable_huge_pages()  # before torch allocates anything, as `ugatit train` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/horse2zebra")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--n-res", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fast_vs_exact.jsonl")
    parser.add_argument("--fast-dtype", default="auto", choices=FAST_DTYPES)
    args = parser.parse_args()

    model, run = configs(img_size=args.img_size, ch=args.ch, n_res=args.n_res, light=True, seed=args.seed)
    torch.manual_seed(args.seed)
    exact = Trainer(model, run)
    fast = Trainer(model, dataclasses.replace(run, precision="fast", fast_dtype=args.fast_dtype))
    for name, net in exact.nets.items():
        fast.nets[name].load_state_dict(net.state_dict())
    batches = {
        domain: infinite_batches(list_images(f"{args.data}/train{domain}"), args.img_size, 1, args.seed, name=domain)
        for domain in "AB"
    }
    log = {"exact": [], "fast": []}
    seconds = {"exact": 0.0, "fast": 0.0}
    with open(args.out, "w") as out:
        for step in range(1, args.steps + 1):
            real_A, real_B = next(batches["A"]), next(batches["B"])
            for path, trainer in (("exact", exact), ("fast", fast)):
                start = time.perf_counter()
                log[path].append(trainer.train_step(real_A, real_B))
                seconds[path] += time.perf_counter() - start
                out.write(json.dumps({"step": step, "path": path, **log[path][-1]}) + "\n")
            out.flush()

    print(f"{args.data}, {args.img_size} px, ch {args.ch}, n_res {args.n_res}, light, batch 1, seed {args.seed}")
    print(f"fast path in {fast.dtype}; torch {torch.__version__}, {describe_cpu()}")
    print(f"s/step: exact {seconds['exact'] / args.steps:.2f}, fast {seconds['fast'] / args.steps:.2f}")
    print("mean of each term per window; rel = |fast - exact| / exact")
    print(f"{'steps':<10}{'term':<20}{'exact':>10}{'fast':>10}{'rel':>8}")
    for first in range(0, args.steps, args.window):
        window = slice(first, first + args.window)
        for term in TERMS:
            e, f = (sum(s[term] for s in log[p][window]) / len(log[p][window]) for p in ("exact", "fast"))
            steps = f"{first + 1}-{min(first + args.window, args.steps)}"
            print(f"{steps:<10}{term:<20}{e:>10.4f}{f:>10.4f}{abs(f - e) / abs(e):>8.3f}")
    skipped = sum(s["skipped_D"] + s["skipped_G"] for path in log.values() for s in path)
    print(f"all {args.steps} steps ({skipped:.0f} updates skipped): sd = step-to-step standard deviation of the exact")
    print("path, |d|/se = difference of the means over the standard error of that difference (steps as independent)")
    print(f"{'term':<20}{'exact':>10}{'fast':>10}{'rel':>8}{'sd/mean':>9}{'|d|/se':>8}")
    for term in TERMS:
        e, f = ([s[term] for s in log[p]] for p in ("exact", "fast"))
        me, mf = statistics.mean(e), statistics.mean(f)
        se = math.sqrt((statistics.variance(e) + statistics.variance(f)) / args.steps)
        sd = statistics.stdev(e) / abs(me)
        print(f"{term:<20}{me:>10.4f}{mf:>10.4f}{abs(mf - me) / abs(me):>8.3f}{sd:>9.2f}{abs(mf - me) / se:>8.2f}")


if __name__ == "__main__":
    main()
