"""Shareable model folders in the Hugging Face Hub layout: `save_pretrained`, `from_pretrained`, push and pull.

A folder holds three files at its top level, which is what the Hub expects and renders:

    config.json          the ModelConfig, plus "ugatit_version", "architecture" and the "directions" it can translate
    model.safetensors    the generator(s) in our checkpoint format (config embedded), so `checkpoint.load_model`,
                         `Translator.from_checkpoint` and `ugatit translate` read the folder as it is
    README.md            the model card: Hub front matter (library, tags, license), training settings, metrics, usage

Only generators are saved: a shared model is for translating, and the discriminators would triple its size.
Pushing and pulling need the optional `huggingface_hub` package (`pip install 'ugatit[hub]'`); nothing else here
touches the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    load_model,
    read_metadata,
    resolve_model,
    save_model,
    write_json,
)  # fmt: skip
from .config import ModelConfig, model_config_from_dict, to_dict
from .extras import require
from .files import atomic_write
from .inference import Translator
from .models import DIRECTIONS, generator_name

CARD_FILE = "README.md"
HUB_FILES = (CONFIG_FILE, MODEL_FILE, CARD_FILE)
ARCHITECTURE = "U-GAT-IT"
TAGS = ("image-to-image", "u-gat-it", "gan")


def _directions(direction: str | None) -> list[str]:
    if direction is None:
        return list(DIRECTIONS)
    generator_name(direction)  # refuses an unknown direction
    return [direction]


def _collect(
    source: Any, direction: str | None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], list[str], str | None]:
    """Model config, generator states, directions and training step (if known) of whatever `save_pretrained` was
    given: a `Translator`, a trainer (anything with `nets`, `model` and `step`), or a checkpoint."""
    if isinstance(source, Translator):
        if direction not in (None, source.direction):
            raise ValueError(f"direction={direction!r}, but the translator translates {source.direction}")
        name = generator_name(source.direction)
        return source.config, {name: source.generator.state_dict()}, [source.direction], None
    directions = _directions(direction)
    names = [generator_name(d) for d in directions]
    if hasattr(source, "nets"):
        return source.model, {name: source.nets[name].state_dict() for name in names}, directions, str(source.step)
    file = resolve_model(source)  # once: a run folder may gain a checkpoint meanwhile
    config, states = load_model(file, names)
    return config, states, directions, read_metadata(file).get("step")


def _cell(value: Any) -> str:
    """A value as one Markdown table cell: lists joined, pipes escaped, on one line."""
    text = ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows: Mapping[str, Any]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def model_card(
    config: ModelConfig,
    directions: list[str],
    training_info: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str = "mit",
) -> str:
    """The README.md of a model folder. Front matter values are JSON strings, which YAML reads as they are."""
    front = [
        "---",
        "library_name: ugatit",
        f"license: {json.dumps(license)}",
        "pipeline_tag: image-to-image",
        "tags:",
        *(f"- {tag}" for tag in TAGS),
        "---",
    ]
    mode = "light" if config.light else "full"
    size_note = (
        "it runs at any size that is a multiple of 4, and by default translates at the trained size"
        if config.light
        else "a full-mode generator only runs at this size; inputs are resized to it"
    )
    first = directions[0]
    generators = f"{' and '.join(directions)} generator" + ("s" if len(directions) > 1 else "")
    body = [
        f"# U-GAT-IT ({', '.join(directions)})",
        "",
        "Unpaired image-to-image translation with U-GAT-IT (Kim et al., ICLR 2020, *Unsupervised Generative "
        "Attentional Networks with Adaptive Layer-Instance Normalization for Image-to-Image Translation*), "
        f"saved by ugatit {__version__}. This folder holds the {generators}, "
        f"{mode} mode, trained at {config.img_size}x{config.img_size} pixels: {size_note}.",
        "",
        "## Usage",
        "",
        "Command line (`pip install ugatit`), with this folder downloaded to `MODEL_DIR`:",
        "",
        "```bash",
        f"ugatit translate MODEL_DIR photos/ --out translated/ --direction {first}",
        "```",
        "",
        "Python:",
        "",
        "```python",
        "from PIL import Image",
        "from ugatit.hub import from_pretrained, pull_from_hub",
        "",
        'folder = pull_from_hub("USER/REPO", "MODEL_DIR")  # needs: pip install "ugatit[hub]"',
        f'translator = from_pretrained(folder, direction="{first}")',
        'translated = translator(Image.open("photo.jpg"), original_size=True)',
        "```",
    ]
    if training_info:
        body += ["", "## Training", "", _table(("training", "value"), training_info)]
    if metrics:
        shown = {name: f"{value:.4g}" if isinstance(value, float) else value for name, value in metrics.items()}
        body += ["", "## Metrics", "", _table(("metric", "value"), shown)]
    body += ["", "## Configuration", "", _table(("setting", "value"), to_dict(config))]
    return "\n".join(front + [""] + body) + "\n"


def save_pretrained(
    model_or_checkpoint: Any,
    directory: str | os.PathLike,
    direction: str | None = None,
    training_info: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    *,
    license: str = "mit",
    overwrite: bool = False,
) -> Path:
    """Write a model folder (config.json, model.safetensors, README.md) that can be pushed to the Hub as it is.

    `model_or_checkpoint` is a checkpoint (file, folder or run folder), a `Translator` or a `Trainer`.
    `direction` None keeps both generators (one for a translator), "A2B" or "B2A" only that one. `training_info`
    (data folders, step, ...) and `metrics` go into the model card; a checkpoint's or trainer's training step is
    added unless given. Every file is written atomically; a folder already holding any of the three files is
    refused unless `overwrite`.
    """
    directory = Path(directory)
    if not overwrite:
        existing = [name for name in HUB_FILES if (directory / name).exists()]
        if existing:
            raise FileExistsError(f"{directory} already holds {', '.join(existing)}; pass overwrite=True to replace")
    config, states, directions, step = _collect(model_or_checkpoint, direction)
    info = ({"step": step} if step is not None else {}) | dict(training_info or {})
    meta = {"step": str(info["step"])} if "step" in info else {}
    save_model(directory / MODEL_FILE, states, config, **meta)
    config_json = {**to_dict(config), "ugatit_version": __version__, "architecture": ARCHITECTURE}
    write_json(directory / CONFIG_FILE, {**config_json, "directions": directions})
    card = model_card(config, directions, info, metrics, license)
    atomic_write(directory / CARD_FILE, lambda tmp: tmp.write_text(card, encoding="utf-8"))
    return directory


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model folder's config.json (folders written before the split list their run's settings
    too; they are dropped)."""
    file = Path(directory) / CONFIG_FILE
    values = json.loads(file.read_text(encoding="utf-8"))
    for key in ("ugatit_version", "architecture", "directions"):
        values.pop(key, None)
    return model_config_from_dict(values, str(file))


def from_pretrained(directory: str | os.PathLike, direction: str = "A2B", **options: Any) -> Translator:
    """A `Translator` for one direction of a model folder (the weights and their embedded config are the truth);
    `options` (device, batch_size, precision, fast_dtype) as `Translator.from_checkpoint` takes them."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a model folder (no {MODEL_FILE}); see ugatit.hub.save_pretrained")
    return Translator.from_checkpoint(directory, direction, **options)


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload U-GAT-IT model",
) -> str:
    """Upload a model folder to the Hub repository `repo_id` (created if needed); returns the commit URL."""
    directory = Path(directory)
    missing = [name for name in HUB_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: no {', '.join(missing)}; write the folder with save_pretrained first")
    hub = require("huggingface_hub", "hub")
    api = hub.HfApi(token=token, library_name="ugatit", library_version=__version__)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=directory, repo_id=repo_id, allow_patterns=list(HUB_FILES), commit_message=commit_message
    )
    return str(commit.commit_url)


def pull_from_hub(
    repo_id: str, local_dir: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> Path:
    """Download the model folder of Hub repository `repo_id` into `local_dir`; returns `local_dir`."""
    hub = require("huggingface_hub", "hub")
    path = hub.snapshot_download(
        repo_id,
        revision=revision,
        local_dir=local_dir,
        token=token,
        allow_patterns=list(HUB_FILES),
        library_name="ugatit",
        library_version=__version__,
    )
    return Path(path)
