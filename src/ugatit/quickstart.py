"""`ugatit quickstart`: the whole product in one command, on a dataset it makes itself.

Generates the synthetic domains, measures the untrained model, trains with the `cpu-small` preset, translates the
test images both ways, measures again, and writes a report (Markdown and HTML) with the sample grids. Running it
again in the same folder resumes or reuses what is there.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Config, preset
from .data import list_images, load_rgb
from .inference import Translator, translate_files
from .models import build_networks
from .synthetic import evaluate_translation, load_mask, write_dataset
from .train import list_checkpoints, train

MARKER = "ugatit-quickstart.json"
N_TRAIN, N_TEST = 300, 30
DIRECTIONS = (("A2B", "A", "B"), ("B2A", "B", "A"))


def _check_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and is not a quickstart folder; choose another --out")


def _scores(translators: dict[str, Translator], data: Path) -> dict[str, dict[str, float]]:
    """Target-domain rate and shape IoU of each direction on the test images."""
    scores = {}
    for name, source, target in DIRECTIONS:
        paths = list_images(data / f"test{source}")
        inputs = [load_rgb(p) for p in paths]
        masks = [load_mask(data / "masks" / f"test{source}" / p.name) for p in paths]
        outputs = translators[name](inputs, original_size=True)
        scores[name] = evaluate_translation(inputs, outputs, source, target, masks)
    return scores


def _untrained(config: Config) -> dict[str, Translator]:
    torch.manual_seed(config.seed)
    nets = build_networks(config)
    return {name: Translator(nets[f"gen{name}"], config, name) for name, _, _ in DIRECTIONS}


def _report(out: Path, config: Config, before: dict, after: dict, seconds: dict[str, float], step: int) -> Path:
    rows = [
        ("A2B: judged domain B", before["A2B"]["target_domain_rate"], after["A2B"]["target_domain_rate"]),
        ("A2B: shape kept (mask IoU)", before["A2B"]["mean_iou"], after["A2B"]["mean_iou"]),
        ("B2A: judged domain A", before["B2A"]["target_domain_rate"], after["B2A"]["target_domain_rate"]),
        ("B2A: shape kept (mask IoU)", before["B2A"]["mean_iou"], after["B2A"]["mean_iou"]),
    ]
    samples = (
        sorted((out / "run" / "samples").glob("A2B_*.png"))[-1:]
        + sorted((out / "run" / "samples").glob("B2A_*.png"))[-1:]
    )
    md = [
        "# ugatit quickstart report",
        "",
        "Domain A: warm shapes on light backgrounds. Domain B: textured cool shapes on dark backgrounds.",
        f"Model: {config.img_size} px, ch {config.ch}, n_res {config.n_res}, light; {step} training steps "
        f"(preset cpu-small), trained in {seconds['train']:.0f} s.",
        "",
        "| metric (test images) | untrained | trained |",
        "|---|---|---|",
        *[f"| {name} | {b:.2f} | {a:.2f} |" for name, b, a in rows],
        "",
        "Sample grids (columns: images; rows: real, identity heatmap, identity, translation heatmap, translation, "
        "cycle heatmap, cycle):",
        "",
        *[f"![{p.stem}](run/samples/{p.name})" for p in samples],
        "",
        "Translations of every test image: `translated/A2B/`, `translated/B2A/` (with `_heatmap` overlays).",
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = "".join(f"<tr><td>{html.escape(n)}</td><td>{b:.2f}</td><td>{a:.2f}</td></tr>" for n, b, a in rows)
    images = "".join(f'<p><img src="run/samples/{p.name}" alt="{p.stem}"></p>' for p in samples)
    page = (
        "<!doctype html><meta charset='utf-8'><title>ugatit quickstart</title>"
        f"<h1>ugatit quickstart report</h1><p>{html.escape(md[3])}</p><p>{html.escape(md[4])}</p>"
        f"<table border=1 cellpadding=4><tr><th>metric (test images)</th><th>untrained</th><th>trained</th></tr>"
        f"{table}</table><h2>Sample grids</h2>{images}"
    )
    (out / "report.html").write_text(page)
    return out / "report.md"


def quickstart(
    out: str | Path = "quickstart_out", config: Config | None = None, progress: bool = True, echo: Callable = print
) -> dict[str, Any]:
    """Run the quickstart in `out`; returns the scores before and after training and the timings."""
    out = Path(out)
    config = config or preset("cpu-small")
    _check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"config": config.to_dict()}, indent=2))
    seconds: dict[str, float] = {}
    t0 = time.time()
    data = write_dataset(out / "data", size=config.img_size, n_train=N_TRAIN, n_test=N_TEST, seed=config.seed)
    before = _scores(_untrained(config), data)
    echo(f"dataset ready in {out / 'data'}; training {config.iterations} steps")

    t1 = time.time()
    train(config, data, out / "run", progress=progress, echo=echo)
    seconds["train"] = time.time() - t1
    checkpoint = list_checkpoints(out / "run")[-1][1]
    translators = {name: Translator.from_checkpoint(checkpoint, name) for name, _, _ in DIRECTIONS}
    after = _scores(translators, data)
    for name, source, _ in DIRECTIONS:
        translate_files(
            translators[name], [str(data / f"test{source}")], out / "translated" / name,
            heatmap=True, overwrite=True, progress=False,
        )  # fmt: skip
    seconds["total"] = time.time() - t0
    report = _report(out, config, before, after, seconds, list_checkpoints(out / "run")[-1][0])
    result = {"before": before, "after": after, "seconds": seconds, "report": str(report)}
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    for name, _, target in DIRECTIONS:
        echo(
            f"{name}: judged domain {target} {before[name]['target_domain_rate']:.0%} -> "
            f"{after[name]['target_domain_rate']:.0%}, shape IoU {before[name]['mean_iou']:.2f} -> "
            f"{after[name]['mean_iou']:.2f}"
        )
    echo(f"report: {report} (and report.html); total {seconds['total']:.0f} s")
    return result
