"""`ugatit import-tf`: seconds and peak memory, on the TF fixture and on a synthetic paper-size bundle.

    python benchmarks/import_tf.py               # the shared fixture, then a paper-size generator bundle (~2.2 GB)
    python benchmarks/import_tf.py --no-paper    # the fixture only

The paper-size bundle holds the two generators of the released selfie2anime configuration (full, 256 px, ch 64,
n_res 4: shapes from the fixture's `paper_config_variables.json`) with random values, written by the tests' minimal
bundle writer; the released file adds the discriminators and the Adam slots, which `--generators-only` never reads.
Each import runs in a fresh process, whose peak resident memory (VmHWM) is compared with the bytes it keeps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_cpu

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "reference" / "fixtures" / "official_tf_small"
CHILD = """
import json, sys, time
from ugatit.tf_import import import_tf
start = time.perf_counter()
report = import_tf(sys.argv[1], sys.argv[2], generators_only=sys.argv[3] == "1", progress=False)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"seconds": seconds, "kept": report.bytes, "peak_kib": int(status["VmHWM"].split()[0])}))
"""
BASELINE = """
import ugatit.tf_import
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(int(status["VmHWM"].split()[0]))
"""


def run_import(path: Path, out: Path, generators_only: bool) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(out), "1" if generators_only else "0"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def paper_generators(folder: Path) -> Path:
    """A bundle of the two paper-size generators, random N(0, 0.02) values."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tf_bundle import write_bundle

    listing = json.loads((FIXTURE / "paper_config_variables.json").read_text())
    variables = listing["variables"] if isinstance(listing, dict) else listing
    rng = np.random.default_rng(0)
    tensors = {
        v["name"]: (rng.standard_normal(v["shape"], dtype=np.float32) * 0.02)
        for v in variables
        if v["name"].startswith("generator_") and v.get("kind", "model_weight") == "model_weight"
    }
    name = "UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing"
    return write_bundle(folder / name / "UGATIT.model-1000000", tensors, per_block=64)


def report(label: str, result: dict, baseline_kib: int) -> None:
    kept, peak, base = result["kept"] / 2**20, result["peak_kib"] / 2**10, baseline_kib / 2**10
    print(
        f"{label}: {result['seconds']:.2f} s, kept {kept:.1f} MiB, peak resident {peak:.0f} MiB = "
        f"{base:.0f} MiB of Python and torch + {peak - base:.0f} MiB ({(peak - base) / kept:.2f}x the kept bytes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size bundle")
    args = parser.parse_args()
    print(describe_cpu())
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = FIXTURE / "UGATIT_fixture_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing"
        report("fixture, all six networks", run_import(folder, tmp / "fixture.safetensors", False), baseline)
        if args.no_paper:
            return
        start = time.perf_counter()
        prefix = paper_generators(tmp / "paper")
        size = Path(f"{prefix}.data-00000-of-00001").stat().st_size
        print(f"wrote the paper-size generator bundle ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
        report("paper size, --generators-only", run_import(prefix.parent, tmp / "paper.safetensors", True), baseline)


if __name__ == "__main__":
    main()
