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

from .checkpoint import list_checkpoints
from .config import ModelConfig, RunConfig, preset, to_dict
from .data import list_images, load_rgb
from .inference import Translator, translate_files
from .models import build_generator
from .synthetic import evaluate_translation, load_mask, write_dataset
from .train import train

MARKER = "ugatit-quickstart.json"
N_TRAIN, N_TEST = 300, 30
TRANSLATIONS = (("A2B", "A", "B"), ("B2A", "B", "A"))  # (direction, source domain, target domain)


def _check_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and is not a quickstart folder; choose another --out")


TestSet = dict[str, tuple[list, list]]


def _test_set(data: Path) -> TestSet:
    """The test images and their shape masks of each direction's source domain, read once."""
    test_set = {}
    for name, source, _ in TRANSLATIONS:
        paths = list_images(data / f"test{source}")
        masks = [load_mask(data / "masks" / f"test{source}" / p.name) for p in paths]
        test_set[name] = ([load_rgb(p) for p in paths], masks)
    return test_set


def _scores(translators: dict[str, Translator] | None, test_set: TestSet) -> dict[str, dict[str, float]]:
    """Target-domain rate and shape IoU of each direction on the test images (`None`: the inputs themselves)."""
    scores = {}
    for name, source, target in TRANSLATIONS:
        inputs, masks = test_set[name]
        outputs = translators[name](inputs, original_size=True) if translators else inputs
        scores[name] = evaluate_translation(inputs, outputs, source, target, masks)
    return scores


def _untrained(model: ModelConfig, seed: int) -> dict[str, Translator]:
    torch.manual_seed(seed)
    return {name: Translator(build_generator(model), model, name) for name, _, _ in TRANSLATIONS}


def _report(out: Path, config: ModelConfig, scores: dict[str, dict], seconds: dict[str, float], step: int) -> Path:
    columns = ("input", "untrained", "trained")
    rows = []
    for name, _, target in TRANSLATIONS:
        rows.append((f"{name}: judged domain {target}", [scores[c][name]["target_domain_rate"] for c in columns]))
        rows.append((f"{name}: shape kept (mask IoU)", [scores[c][name]["mean_iou"] for c in columns]))
    grids = [max((out / "run" / "samples").glob(f"{name}_*.png"), default=None) for name, _, _ in TRANSLATIONS]
    grids = [g for g in grids if g is not None]
    intro = [
        "Domain A: warm shapes on light backgrounds. Domain B: textured cool shapes on dark backgrounds.",
        f"Model: {config.describe()}, preset cpu-small; "
        f"{step} training steps in {seconds['train']:.0f} s ({seconds['total']:.0f} s in all).",
        "Columns: the test images themselves (no translation), the untrained model, the trained model. A model that "
        "learned turns most images into the other domain (high 'judged' rate) and keeps their shapes (high IoU).",
    ]
    md = [
        "# ugatit quickstart report", "", *intro, "",
        "| metric (test images) | input | untrained | trained |", "|---|---|---|---|",
        *[f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for label, values in rows],
        "", "Sample grids (one column per image; rows: real, identity heatmap, identity, translation heatmap, "
        "translation, cycle heatmap, cycle):", "",
        *[f"![{p.stem}](run/samples/{p.name})" for p in grids], "",
        "Every test image translated, with heatmap overlays: `translated/A2B/`, `translated/B2A/`.",
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{v:.2f}</td>" for v in values) + "</tr>"
        for label, values in rows
    )
    images = "".join(f'<p><img src="run/samples/{p.name}" alt="{p.stem}"></p>' for p in grids)
    page = (
        "<!doctype html><meta charset='utf-8'><title>ugatit quickstart</title><h1>ugatit quickstart report</h1>"
        + "".join(f"<p>{html.escape(line)}</p>" for line in intro)
        + "<table border=1 cellpadding=4><tr><th>metric (test images)</th><th>input</th><th>untrained</th>"
        + f"<th>trained</th></tr>{table}</table><h2>Sample grids</h2>{images}"
    )
    (out / "report.html").write_text(page)
    return out / "report.md"


def quickstart(
    out: str | Path = "quickstart_out",
    configs: tuple[ModelConfig, RunConfig] | None = None,
    progress: bool = True,
    echo: Callable = print,
) -> dict[str, Any]:
    """Run the quickstart in `out`; returns the scores (input / untrained / trained) and the timings.

    It runs on one CPU thread: the cpu-small model is too small to gain from a second one (one thread was the
    faster in a sweep on an idle 2-core machine), and OpenMP threads slow down badly when other jobs share the
    cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _quickstart(Path(out), *(configs or preset("cpu-small")), progress, echo)
    finally:
        torch.set_num_threads(threads)


def _quickstart(out: Path, model: ModelConfig, run: RunConfig, progress: bool, echo: Callable) -> dict[str, Any]:
    _check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"model": to_dict(model), "run": to_dict(run)}, indent=2))
    seconds: dict[str, float] = {}
    t0 = time.time()
    data = write_dataset(out / "data", size=model.img_size, n_train=N_TRAIN, n_test=N_TEST, seed=run.seed)
    test_set = _test_set(data)
    scores = {"input": _scores(None, test_set), "untrained": _scores(_untrained(model, run.seed), test_set)}
    echo(f"dataset ready in {out / 'data'}; training {run.iterations} steps")

    t1 = time.time()
    train(model, run, data, out / "run", progress=progress, echo=echo)
    seconds["train"] = time.time() - t1
    step, checkpoint = list_checkpoints(out / "run")[-1]
    translators = {name: Translator.from_checkpoint(checkpoint, name) for name, _, _ in TRANSLATIONS}
    scores["trained"] = _scores(translators, test_set)
    for name, source, _ in TRANSLATIONS:
        translate_files(
            translators[name], [str(data / f"test{source}")], out / "translated" / name,
            heatmap=True, overwrite=True, progress=False,
        )  # fmt: skip
    seconds["total"] = time.time() - t0
    report = _report(out, model, scores, seconds, step)
    result = {"scores": scores, "seconds": seconds, "report": str(report)}
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    for name, _, target in TRANSLATIONS:
        before, after = scores["untrained"][name], scores["trained"][name]
        echo(
            f"{name}: judged domain {target} {scores['input'][name]['target_domain_rate']:.0%} as input, "
            f"{after['target_domain_rate']:.0%} translated; shape IoU {before['mean_iou']:.2f} untrained -> "
            f"{after['mean_iou']:.2f} trained"
        )
    echo(f"report: {report} (and report.html); total {seconds['total']:.0f} s")
    return result
